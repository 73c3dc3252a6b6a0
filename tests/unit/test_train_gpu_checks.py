"""The GPU checks (tests/gpu) and scripts/gpu_check.sh, as far as a CPU machine can see
them: every check is marked gpu, and collecting them needs no Ray, config or MLflow (a GPU
machine may have torch and transformers only). Running them takes a GPU."""

import os
import subprocess
import sys

from tests.conftest import ROOT

GPU_CHECKS = 15
COLLECT = ["tests/gpu", "--collect-only", "-q", "--confcutdir", "tests/gpu"]
COLLECT += ["-p", "no:cacheprovider"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_the_gpu_checks_are_all_marked_and_load_without_ray_or_the_config():
    code = f"""
import sys

for name in ("ray", "pydantic", "mlflow"):
    sys.modules[name] = None  # absent, as on a bare GPU machine
import pytest

rc = pytest.main({COLLECT!r} + ["-m", "gpu"])
unmarked = pytest.main({COLLECT!r} + ["-m", "not gpu"])
# What the checks import inside their bodies, beyond what collection imported:
import torch.distributed.fsdp
import lepton_ray.compress.modules
import lepton_ray.train.parallel
from lepton_ray.tasks.classification_eval import collate
import peft
from tests.gpu.conftest import learnable_rows, tiny_classifier
from tests.gpu.test_causal_lm_cuda import tiny_llama

tiny_llama()
rows = learnable_rows(4)
tiny_classifier()(**collate(rows.sequences(range(4)), None, 0))
print("RESULT", rc, unmarked)
"""
    out = _python(code)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = [line for line in out.stdout.splitlines() if line.startswith("tests/gpu/")]
    assert len(collected) == GPU_CHECKS, out.stdout
    names = ("cuda_is_available", "bf16_matmul", "loop_trains", "fsdp2", "weight_only")
    names += ("packing_with_sdpa", "flash_attention_2", "lora_llama", "shards_a_llama")
    for name in names:
        assert any(name in line for line in collected), name
    assert "RESULT 0 5" in out.stdout  # 5: nothing collected, every check is marked gpu


def test_gpu_check_script_runs_the_gpu_checks_with_ray_blocked():
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--collect-only", "-q"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ray: installed (blocked)" in out.stdout or "ray: absent" in out.stdout
    assert f"{GPU_CHECKS} tests collected" in out.stdout, out.stdout
