"""Shared helpers for benchmarks: machine facts, A/B timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    try:
        cpu = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
        )
        info["cpu"] = cpu.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["git_sha"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    info["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return info


def alternate(
    runs: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Call each run in turn (A B A B ...) after a warm-up; each returns a rate (higher = faster)."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(fn())
    return samples


def timed(fn: Callable[[], int]) -> float:
    """Items per second of one call of ``fn`` (which returns how many items it processed)."""
    start = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - start)


def median(values: list[float]) -> float:
    return statistics.median(values)


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def start_bare(script: str, folder: Path, threads: int, log: Path | None = None):
    """Start ``script --bare-server FOLDER --port P --threads N`` (a benchmark's baseline
    server) on a free port of 127.0.0.1; returns (process, URL) once ``/healthz`` answers."""
    import sys

    import requests

    from lepton_ray.runtime.cluster import free_port

    port = free_port()
    cmd = [sys.executable, script, "--bare-server", str(folder)]
    cmd += ["--port", str(port), "--threads", str(threads)]
    with open(log or os.devnull, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            break
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    proc.kill()
    tail = log.read_text(errors="replace")[-2000:] if log else ""
    raise SystemExit(f"the bare server did not start\n{tail}".rstrip())
