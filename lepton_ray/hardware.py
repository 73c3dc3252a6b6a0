"""What this machine's processor can do, read once and shared by training, compression and
serving (bf16 and int8 units, the vector ISA torch dispatches to). No Ray here."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class CpuFeatures:
    """A processor's name, vendor and ``/proc/cpuinfo`` flags.

    ``torch_capability`` is the vector ISA torch dispatches to on this machine
    (``torch.backends.cpu.get_cpu_capability()``); it is filled in only when the features
    were read from this machine, and empty for a given cpuinfo text.
    """

    model_name: str
    vendor: str
    flags: frozenset[str]
    torch_capability: str = ""

    @property
    def bf16_native(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def amx(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def avx512_vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def vector_isa(self) -> str:
        """The widest vector ISA: torch's own dispatch level if known, else the flags'."""
        if self.torch_capability:
            return self.torch_capability
        if self.avx512:
            return "AVX512"
        if "avx2" in self.flags:
            return "AVX2"
        return "no AVX2" if self.flags else "unknown ISA"

    def units(self) -> list[str]:
        """``["AVX512", "AMX-BF16", "AMX-INT8", "VNNI"]``: what matters for training speed."""
        units = [self.vector_isa]
        if self.amx:
            units.append("AMX-BF16")
            if "amx_int8" in self.flags:
                units.append("AMX-INT8")
        elif "avx512_bf16" in self.flags:
            units.append("AVX512-BF16")
        if self.avx512_vnni:
            units.append("VNNI")
        return units

    def describe(self) -> str:
        """``Intel Xeon ... (AVX512, AMX-BF16, AMX-INT8, VNNI; bf16: native)``, one line."""
        native = "native" if self.bf16_native else "emulated"
        return f"{self.model_name} ({', '.join(self.units())}; bf16: {native})"


def _torch_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return ""


def cpu_features(cpuinfo_text: str | None = None) -> CpuFeatures:
    """The processor's name and instruction-set flags (from ``/proc/cpuinfo`` on Linux).

    Without ``cpuinfo_text`` this machine's ``/proc/cpuinfo`` is read; where there is none
    (macOS, Windows, a sandbox) the flags are empty and the name comes from ``platform``.
    Only the first processor's entry counts (they are the same on one machine).
    """
    here = cpuinfo_text is None
    if here:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo_text = ""
    fields: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip().lower(), value.strip())
    name = fields.get("model name") or (platform.processor() if here else "") or "unknown CPU"
    return CpuFeatures(
        model_name=" ".join(name.split()),
        vendor=fields.get("vendor_id", ""),
        flags=frozenset(fields.get("flags", "").lower().split()),
        torch_capability=_torch_capability() if here else "",
    )
