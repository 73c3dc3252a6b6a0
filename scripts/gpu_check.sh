#!/usr/bin/env bash
# The GPU checks (tests/gpu, marker gpu) on a machine with a CUDA GPU, without Ray.
#
#   scripts/gpu_check.sh                 # run them all
#   scripts/gpu_check.sh -k fsdp         # extra arguments go to pytest
#   PYTHON=.venv/bin/python scripts/gpu_check.sh
#
# Needs torch (CUDA build), transformers, numpy and pandas; torchao for the weight-only
# checks and vLLM for the generation API's GPU path (each skipped, saying so, without
# it; `pip install vllm` first to cover serve.engine: vllm). Ray need not be installed: `import ray` is made to fail, so
# a check that leans on Ray fails here too, and --confcutdir keeps tests/conftest.py (which
# needs the config's dependencies) out. Record what it prints in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" - <<'PY'
import importlib.util
import platform

import torch

cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
print(f"device: {torch.cuda.get_device_name() if cuda else 'none (the checks will fail)'}")
for name in ("transformers", "peft", "accelerate", "torchao", "vllm", "flash_attn", "ray"):
    spec = importlib.util.find_spec(name)
    print(f"{name}: {'installed' if spec else 'absent'}{' (blocked)' if name == 'ray' else ''}")
PY
exec "$PYTHON" -c '
import sys

sys.modules["ray"] = None  # import ray (and ray.anything) raises ImportError
import pytest

args = ["tests/gpu", "-m", "gpu", "--confcutdir", "tests/gpu", "-p", "no:cacheprovider", "-v"]
sys.exit(pytest.main(args + sys.argv[1:]))
' "$@"
