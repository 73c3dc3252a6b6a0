"""Training and inference precision, chosen at run time from what the hardware has.

On CPUs bf16 pays only where the processor computes it natively (AVX512-BF16, AMX-BF16):
elsewhere oneDNN emulates it and it runs slower than fp32. On GPUs bf16 is used where it
is supported, else fp16 with a gradient scaler. No Ray here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from lepton_ray.errors import ConfigError
from lepton_ray.hardware import CpuFeatures, cpu_features

SETTINGS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """What the forward passes run in, on which device type, and why (for the log)."""

    name: Literal["fp32", "bf16", "fp16"]
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.name)

    @property
    def use_grad_scaler(self) -> bool:
        return self.name == "fp16" and self.device_type == "cuda"

    def autocast(self):
        """A fresh context manager for one forward pass (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def _cuda_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU (Ampere or newer, or ROCm); not the slow emulated path."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch before 2.3 has no including_emulation
            return bool(torch.cuda.is_bf16_supported())


def resolve_precision(
    setting: str, device: torch.device | str, features: CpuFeatures | None = None
) -> Precision:
    """``auto``/``fp32``/``bf16``/``fp16`` -> what to run, with a sentence saying why.

    GPU: auto is bf16 where supported, else fp16 (with a gradient scaler); bf16 on a GPU
    without it is refused. CPU: auto is bf16 only where the CPU computes it natively, else
    fp32; bf16 asked for is honoured even where emulated (slow); fp16 is refused.
    """
    if setting not in SETTINGS:
        raise ConfigError(f"train.precision {setting!r}: expected one of {', '.join(SETTINGS)}")
    device = torch.device(device)
    kind = device.type
    if kind == "cuda":
        name = torch.cuda.get_device_name(device)
        has_bf16 = _cuda_bf16(device)
        if setting == "auto":
            if has_bf16:
                return Precision("bf16", kind, f"bf16 autocast: {name} supports bf16")
            return Precision(
                "fp16", kind, f"fp16 autocast with a gradient scaler: {name} has no bf16"
            )
        if setting == "bf16" and not has_bf16:
            raise ConfigError(
                f"train.precision bf16: {name} does not support bf16; use fp16 or auto"
            )
        if setting == "fp16":
            return Precision("fp16", kind, f"fp16 autocast with a gradient scaler on {name}")
        return Precision(setting, kind, f"{setting} as configured on {name}")
    if kind != "cpu":
        if setting in ("auto", "fp32"):
            return Precision("fp32", kind, f"fp32 on {kind}")
        return Precision(setting, kind, f"{setting} autocast as configured on {kind}")
    if setting == "fp16":
        raise ConfigError("train.precision fp16 needs a GPU; on CPUs use bf16 or auto")
    features = features or cpu_features()
    cpu = features.model_name
    native = next((u for u in features.units() if "BF16" in u), "")
    if setting == "auto":
        if features.bf16_native:
            return Precision("bf16", kind, f"bf16 autocast: {cpu} has {native}")
        return Precision(
            "fp32", kind, f"fp32: {cpu} has no native bf16 ({features.vector_isa} only)"
        )
    if setting == "bf16":
        if features.bf16_native:
            return Precision("bf16", kind, f"bf16 autocast as configured: {cpu} has {native}")
        return Precision(
            "bf16",
            kind,
            f"bf16 autocast as configured, but {cpu} has no native bf16 "
            f"({features.vector_isa} only): emulated, likely slower than fp32",
        )
    return Precision("fp32", kind, f"fp32 as configured: {features.describe()}")
