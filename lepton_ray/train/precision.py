"""Training and inference precision, chosen at run time from what the hardware has.

On CPUs bf16 pays only where the processor computes it natively (AVX512-BF16, AMX-BF16):
elsewhere oneDNN emulates it and it runs slower than fp32. On GPUs bf16 is used where it
is supported, else fp16 with a gradient scaler. No Ray here.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from lepton_ray.errors import ConfigError


@dataclass(frozen=True)
class CpuFeatures:
    model_name: str
    vendor: str
    flags: frozenset[str]

    @property
    def bf16_native(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def amx(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    def describe(self) -> str:
        """``Intel Xeon ... (AVX512, AMX-BF16, VNNI; bf16 native)``, for logs and figures."""
        units = ["AVX512" if self.avx512 else "AVX2" if "avx2" in self.flags else "no AVX2"]
        if self.amx:
            units.append("AMX-BF16" + (", AMX-INT8" if "amx_int8" in self.flags else ""))
        elif "avx512_bf16" in self.flags:
            units.append("AVX512-BF16")
        if self.vnni:
            units.append("VNNI")
        native = "native" if self.bf16_native else "emulated"
        return f"{self.model_name} ({', '.join(units)}; bf16 {native})"


def cpu_features(cpuinfo_text: str | None = None) -> CpuFeatures:
    """The processor's name and instruction-set flags (from ``/proc/cpuinfo`` on Linux)."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo_text = ""
    fields: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    return CpuFeatures(
        model_name=fields.get("model name") or platform.processor() or "unknown CPU",
        vendor=fields.get("vendor_id", ""),
        flags=frozenset(fields.get("flags", "").split()),
    )


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def use_grad_scaler(self) -> bool:
        return self.name == "fp16" and self.device_type == "cuda"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(
    setting: str, device: torch.device, features: CpuFeatures | None = None
) -> Precision:
    """``auto``/``fp32``/``bf16``/``fp16`` -> what to run, with a sentence saying why."""
    kind = device.type
    if kind == "cuda":
        name = torch.cuda.get_device_name(device)
        has_bf16 = torch.cuda.is_bf16_supported()
        if setting == "auto":
            pick = "bf16" if has_bf16 else "fp16"
            return Precision(
                pick,
                kind,
                f"{pick} autocast: {name} "
                + ("supports bf16" if has_bf16 else "has no bf16 (fp16 with a gradient scaler)"),
            )
        if setting == "bf16" and not has_bf16:
            raise ConfigError(
                f"train.precision bf16: {name} does not support bf16; use fp16 or auto"
            )
        return Precision(setting, kind, f"{setting} as configured on {name}")
    features = features or cpu_features()
    cpu = features.describe()
    if setting == "fp16":
        raise ConfigError("train.precision fp16 needs a GPU; on CPUs use bf16 or auto")
    if setting == "auto":
        if features.bf16_native:
            return Precision("bf16", kind, f"bf16 autocast: {cpu}")
        return Precision("fp32", kind, f"fp32: {cpu}")
    if setting == "bf16" and not features.bf16_native:
        return Precision("bf16", kind, f"bf16 as configured, emulated (slow): {cpu}")
    return Precision(setting, kind, f"{setting} as configured: {cpu}")
