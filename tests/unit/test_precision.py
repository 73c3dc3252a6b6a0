"""Precision from the hardware: cpuinfo parsing, CPU and (mocked) GPU choices."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lepton_ray import hardware
from lepton_ray.errors import ConfigError, LeptonError
from lepton_ray.hardware import CpuFeatures, cpu_features
from lepton_ray.train.precision import Precision, resolve_precision

_BASE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat sse sse2 ht syscall "
    "nx lm constant_tsc pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 popcnt aes xsave avx "
    "f16c rdrand hypervisor bmi1 avx2 bmi2 erms"
)

XEON_AMX = f"""processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: {_BASE} avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_bf16 \
avx512_vnni avx512_fp16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: {_BASE} avx512f amx_bf16 amx_tile amx_int8
"""

EPYC_AVX2 = f"""processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model name\t: AMD EPYC 7B12
flags\t\t: {_BASE} sse4a misalignsse sha_ni clzero
"""

COOPER_LAKE = f"""vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8380H
flags\t\t: {_BASE} avx512f avx512_vnni avx512_bf16
"""

CPU = torch.device("cpu")


def test_amx_xeon_features():
    f = cpu_features(XEON_AMX)
    assert isinstance(f, CpuFeatures)
    assert f.model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert f.vendor == "GenuineIntel"
    assert {"amx_bf16", "amx_tile", "avx512_bf16"} <= f.flags
    assert f.bf16_native and f.amx and f.avx512_vnni and f.avx512
    assert f.torch_capability == ""  # a given text is not this machine
    assert f.describe() == (
        "Intel(R) Xeon(R) Platinum 8480+ (AVX512, AMX-BF16, AMX-INT8, VNNI; bf16: native)"
    )


def test_avx2_epyc_features():
    f = cpu_features(EPYC_AVX2)
    assert (f.model_name, f.vendor) == ("AMD EPYC 7B12", "AuthenticAMD")
    assert not (f.bf16_native or f.amx or f.avx512_vnni or f.avx512)
    assert f.describe() == "AMD EPYC 7B12 (AVX2; bf16: emulated)"


def test_avx512_bf16_without_amx():
    f = cpu_features(COOPER_LAKE)
    assert f.bf16_native and not f.amx and f.avx512_vnni
    assert f.describe().endswith("(AVX512, AVX512-BF16, VNNI; bf16: native)")


def test_features_frozen():
    f = cpu_features(EPYC_AVX2)
    with pytest.raises(AttributeError):
        f.model_name = "x"  # type: ignore[misc]


def test_missing_cpuinfo(monkeypatch):
    def missing(self, *args, **kwargs):
        raise FileNotFoundError(str(self))

    monkeypatch.setattr(hardware.Path, "read_text", missing)
    monkeypatch.setattr(hardware.platform, "processor", lambda: "arm")
    f = cpu_features()
    assert f.flags == frozenset() and f.model_name == "arm" and f.vendor == ""
    assert not f.bf16_native
    assert resolve_precision("auto", CPU, f).name == "fp32"
    monkeypatch.setattr(hardware.platform, "processor", lambda: "")
    assert cpu_features().model_name == "unknown CPU"
    assert cpu_features("").model_name == "unknown CPU"


def test_cpu_auto_on_amx_xeon_is_bf16():
    p = resolve_precision("auto", CPU, cpu_features(XEON_AMX))
    assert (p.name, p.device_type, p.dtype) == ("bf16", "cpu", torch.bfloat16)
    assert not p.use_grad_scaler
    assert p.reason == "bf16 autocast: Intel(R) Xeon(R) Platinum 8480+ has AMX-BF16"


def test_cpu_auto_on_epyc_is_fp32():
    p = resolve_precision("auto", CPU, cpu_features(EPYC_AVX2))
    assert (p.name, p.dtype) == ("fp32", None)
    assert p.reason == "fp32: AMD EPYC 7B12 has no native bf16 (AVX2 only)"
    assert isinstance(p.autocast(), contextlib.nullcontext)


def test_cpu_explicit_settings():
    epyc = cpu_features(EPYC_AVX2)
    p = resolve_precision("bf16", CPU, epyc)
    assert p.name == "bf16" and "emulated" in p.reason and "slower" in p.reason
    assert resolve_precision("bf16", CPU, cpu_features(XEON_AMX)).name == "bf16"
    assert resolve_precision("fp32", CPU, cpu_features(XEON_AMX)).name == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a GPU; on CPUs use bf16 or auto"):
        resolve_precision("fp16", CPU, epyc)
    with pytest.raises(ConfigError, match="expected one of"):
        resolve_precision("fp8", CPU, epyc)
    assert issubclass(ConfigError, LeptonError)


def test_cpu_bf16_autocast_runs():
    p = Precision("bf16", "cpu", "test")
    layer = torch.nn.Linear(4, 2)
    with p.autocast():
        out = layer(torch.randn(3, 4))
    assert out.dtype == torch.bfloat16
    with Precision("fp32", "cpu", "test").autocast():
        assert layer(torch.randn(3, 4)).dtype == torch.float32


def test_real_machine_is_consistent():
    f = cpu_features()
    assert f.model_name
    assert f.describe().startswith(f.model_name)
    assert f.describe().endswith("bf16: native)" if f.bf16_native else "bf16: emulated)")
    if f.torch_capability:
        assert f.describe().startswith(f"{f.model_name} ({f.torch_capability}")
    p = resolve_precision("auto", "cpu")
    assert p.name == ("bf16" if f.bf16_native else "fp32")
    assert p.device_type == "cpu" and f.model_name in p.reason


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device as far as ``resolve_precision`` asks; ``state["bf16"]`` says if bf16."""
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: state["bf16"]
    )
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return state


def test_gpu_choices(fake_gpu):
    gpu = torch.device("cuda", 0)
    p = resolve_precision("auto", gpu)
    assert (p.name, p.device_type, p.use_grad_scaler) == ("bf16", "cuda", False)
    assert "Fake GPU" in p.reason
    assert resolve_precision("bf16", gpu).name == "bf16"
    fp16 = resolve_precision("fp16", gpu)
    assert fp16.name == "fp16" and fp16.use_grad_scaler and fp16.dtype == torch.float16
    assert resolve_precision("fp32", gpu).name == "fp32"

    fake_gpu["bf16"] = False
    p = resolve_precision("auto", gpu)
    assert (p.name, p.use_grad_scaler) == ("fp16", True)
    with pytest.raises(ConfigError, match="Fake GPU does not support bf16; use fp16 or auto"):
        resolve_precision("bf16", gpu)
