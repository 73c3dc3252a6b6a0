"""Which compressed format to make: ``compress.method`` and ``compress.target`` against the
hardware. Pure logic (no model, no Ray), so every branch is unit-tested without a GPU.

CPU, ``auto``: bf16 weights where the CPU multiplies bf16 natively with AMX (on an AMX Xeon,
MiniLM batch 32: fp32 95, dynamic int8 148, bf16 weights 334 samples/s), else int8. Which
int8: ``dynamic_int8`` (torch, fbgemm) - on the AVX2-only AMD EPYC it was the faster of the
two int8 backends at batch 32, as fast as ONNX Runtime at batch 1, and the more accurate
(``benchmarks/RESULTS.md``, "Compression formats"). bf16 on a CPU without native bf16 is
emulated and slower than fp32; it is only made when asked for.

GPU (``compress.target: gpu``), ``auto``: int8 weight-only (torchao); int4 weight-only is
made only when asked for (a larger accuracy risk for half the memory again).
"""

from __future__ import annotations

from dataclasses import dataclass

from lepton_ray.errors import ConfigError
from lepton_ray.hardware import CpuFeatures

CPU_METHODS = ("dynamic_int8", "onnx_int8", "bf16")
GPU_METHODS = ("int8_weight_only", "int4_weight_only")
METHODS = ("auto", "none", "fp32", *CPU_METHODS, *GPU_METHODS)
"""``fp32``: the float model as it is, for a pruned one (``compress.prune``); any target."""
TARGETS = ("cpu", "gpu", "auto")


@dataclass(frozen=True)
class Choice:
    """The method to run, the hardware it targets, and one line saying why."""

    method: str
    target: str
    reason: str


def choose_method(
    method: str,
    target: str,
    cpu: CpuFeatures,
    cuda_name: str | None = None,
    onnxruntime: bool = True,
) -> Choice:
    """Resolve ``compress.method``/``compress.target`` on this machine.

    ``cuda_name``: the GPU here (None: none). ``onnxruntime``: whether it is installed.
    A GPU method without a GPU, or ``onnx_int8`` without ONNX Runtime, is a ``ConfigError``.
    """
    if method not in METHODS:
        raise ConfigError(f"compress.method {method!r}: expected one of {', '.join(METHODS)}")
    if target not in TARGETS:
        raise ConfigError(f"compress.target {target!r}: expected one of {', '.join(TARGETS)}")
    if method == "none":
        return Choice("none", "cpu", "compress.method is none")
    if target == "auto":
        target = "gpu" if cuda_name else "cpu"
    if method in GPU_METHODS and target == "cpu":
        raise ConfigError(
            f"compress.method {method} is a GPU format; set compress.target: gpu "
            f"(or auto on a machine with a CUDA GPU)"
        )
    if target == "gpu" and not cuda_name:
        raise ConfigError(
            "compress.target gpu needs a CUDA GPU where compress runs (to measure the "
            "quantized model); none is here"
        )
    if method == "onnx_int8" and not onnxruntime:
        raise ConfigError("compress.method onnx_int8 needs onnxruntime; pip install onnxruntime")
    cpu_name = cpu.describe()
    if method != "auto":
        where = cuda_name if target == "gpu" else cpu_name
        return Choice(method, target, f"{method} as configured (target {target}: {where})")
    if target == "gpu":
        return Choice(
            "int8_weight_only",
            "gpu",
            f"int8 weight-only (torchao) on {cuda_name}: half the bf16 weights' memory at "
            f"about bf16 accuracy; int4_weight_only only when configured",
        )
    if cpu.amx:
        return Choice(
            "bf16",
            "cpu",
            f"bf16 weights: {cpu_name} multiplies bf16 on AMX tiles (about 2.3x dynamic int8 "
            f"and 3.5x fp32 for MiniLM on such a CPU), with no int8 accuracy loss",
        )
    return Choice(
        "dynamic_int8",
        "cpu",
        f"dynamic int8 (torch): {cpu_name} has no AMX, so bf16 is "
        f"{'no faster than int8' if cpu.bf16_native else 'emulated and slower than fp32'}",
    )
