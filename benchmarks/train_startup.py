"""Ray Train's fixed start-up cost: ``TorchTrainer.fit`` of a function that does nothing.

What every training run and every Tune trial pays before its first step and after its last:
the controller actor, the worker group (processes, torch imports, the gloo process group)
and the controller's polling. Two settings of the controller's poll interval
(``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``) side by side: Ray's default, 2 s, and the 0.5 s
that lepton-ray's ``runtime.cluster.worker_env`` sets.

Each variant runs in a fresh process with its own local Ray (the controller reads the
variable when it starts); each process times ``--fits`` fits and keeps the median of all
but the first (a warm-up: the first fit imports torch in a new worker pool). Variants
alternate A B A B for ``--rounds`` rounds; the table gives the median over rounds.

    .venv/bin/python benchmarks/train_startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median  # noqa: E402
from train_throughput import log, machine_facts, save  # noqa: E402

VARIANTS = {"ray default (2 s)": "2.0", "lepton-ray (0.5 s)": "0.5"}


def one_process(fits: int, workers: int) -> None:
    """Run in the child: ``fits`` trivial fits; print their wall times as JSON."""
    from train_throughput import private_ray

    with private_ray(num_cpus=2, dashboard=True) as scratch:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        def nothing(config) -> None:
            return None

        times = []
        for i in range(fits):
            started = time.perf_counter()
            TorchTrainer(
                nothing,
                scaling_config=ScalingConfig(num_workers=workers),
                run_config=RunConfig(storage_path=str(scratch / "results"), name=f"fit{i}"),
            ).fit()
            times.append(time.perf_counter() - started)
    print("TIMES " + json.dumps(times), flush=True)


def run_variant(interval: str, fits: int, workers: int) -> list[float]:
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval}
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--fits", str(fits), "--workers", str(workers)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("TIMES ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(
            f"variant {interval} s failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        )
    return json.loads(line.removeprefix("TIMES "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fits", type=int, default=4, help="fits per process (first: warm-up)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (1 CPU each)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one_process(args.fits, args.workers)
        return
    rounds: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, interval in VARIANTS.items():
            times = run_variant(interval, args.fits, args.workers)
            rounds[name].append(times)
            log(f"[bench] round {r + 1} {name}: " + ", ".join(f"{t:.2f}" for t in times) + " s")
    summary = {name: median([median(t[1:]) for t in runs]) for name, runs in rounds.items()}
    base = summary["ray default (2 s)"]
    result = {
        "machine": machine_facts(),
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "fit_seconds": rounds,
        "median_fit_seconds": summary,
    }
    path = save(result, args.out, "train_startup")
    print(f"\nwrote {path}\n")
    print(f"| poll interval | median s per trivial fit ({args.workers} workers) | vs default |")
    print("| --- | ---: | ---: |")
    for name, value in summary.items():
        print(f"| {name} | {value:.2f} | {value - base:+.2f} s |")


if __name__ == "__main__":
    main()
