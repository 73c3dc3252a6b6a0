"""Preprocessing SST-2 train: lepton-ray's data stage against plain single-process `datasets`.

    .venv/bin/python benchmarks/preprocess.py --repeats 3

Both sides read ``../shared/data/sst2/train.tsv`` (67,349 rows) and tokenize every sentence
with the same tokenizer (``load_tokenizer("minilm")``, truncation at 64 tokens):

* baseline: ``datasets.load_dataset("csv", delimiter="\\t")`` then ``.map(tokenize,
  batched=True)`` in this process, with a fresh cache folder and ``keep_in_memory=True`` on
  every call, so no call reuses an earlier one's Arrow cache. It only loads and tokenizes:
  nothing is cleaned, deduplicated, split or written. The tokenizer's own threads run as the
  environment has them (``TOKENIZERS_PARALLELISM``, recorded in the result).
* lepton-ray: ``lepton_ray.data.preprocess.run_preprocess`` on a minimal experiment YAML, the
  whole data stage (read, clean, deduplicate, split, tokenize, write Parquet and the
  manifest), on a private local Ray started once beforehand with every core; each call
  writes to a new output folder, so the stage's cache is never hit. Ray's start-up is timed
  apart and excluded from the rows/s.

Each side runs once as a warm-up (reported as "first call": imports, tokenizer loads, Ray
worker start-up), then the sides alternate (A B A B ...) ``--repeats`` times; the table shows
the median rows/s (rows read / wall seconds of the call) and the ratio. Peak memory is
sampled every 0.2 s during the warm-up call: resident memory (RSS) and proportional set size (PSS, which splits
pages shared between processes, such as Ray's object store, among them) summed over this
process and every process it started (Ray's GCS, raylet and workers). The baseline runs in
this process while Ray sits idle, so its figure is this process alone; Ray's idle footprint
is reported apart. (Sampling costs about 5 ms of one core per sample, on both sides.) Results go to ``benchmarks/results/preprocess-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
MB = 1024 * 1024


# ------------------------------------------------------------------------------------ memory
class MemorySampler:
    """Peak RSS and PSS of this process and of all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self.me = psutil.Process()
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak: dict[str, float] = {}

    def snapshot(self) -> dict[str, float]:
        """MB now: this process, its descendants (Ray), and the sum; RSS and PSS."""
        psutil = self._psutil
        out = {"driver_rss": 0.0, "ray_rss": 0.0, "driver_pss": 0.0, "ray_pss": 0.0}
        procs = [(self.me, "driver")]
        with contextlib.suppress(psutil.Error):
            procs += [(p, "ray") for p in self.me.children(recursive=True)]
        for proc, who in procs:
            try:
                info = proc.memory_full_info()  # rss, and pss from /proc/PID/smaps_rollup
            except psutil.Error:  # exited between listing and reading
                continue
            out[f"{who}_rss"] += info.rss / MB
            out[f"{who}_pss"] += getattr(info, "pss", 0) / MB
        out["total_rss"] = out["driver_rss"] + out["ray_rss"]
        out["total_pss"] = out["driver_pss"] + out["ray_pss"]
        out["processes"] = len(procs)
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._merge(self.snapshot())
            self._stop.wait(self.interval)

    def _merge(self, snap: dict[str, float]) -> None:
        for key, value in snap.items():
            self.peak[key] = max(self.peak.get(key, 0.0), value)

    def __enter__(self) -> MemorySampler:
        self.peak = {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._merge(self.snapshot())


# ---------------------------------------------------------------------------------- the sides
def baseline_once(
    data: Path, tokenizer, max_length: int, scratch: Path
) -> tuple[int, float, dict[str, float]]:
    """Load the TSV and tokenize it with `datasets`, from scratch; (rows, seconds, parts)."""
    from datasets import load_dataset

    cache = Path(tempfile.mkdtemp(prefix="hf-", dir=scratch))
    try:
        start = time.perf_counter()
        ds = load_dataset(
            "csv",
            data_files=str(data),
            delimiter="\t",
            quoting=3,  # csv.QUOTE_NONE: SST-2 quotes are text, as lepton-ray reads TSV
            split="train",
            cache_dir=str(cache),
            keep_in_memory=True,
        )
        loaded = time.perf_counter()
        ds = ds.map(
            lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=max_length),
            batched=True,
            keep_in_memory=True,
        )
        rows = len(ds)
        seconds = time.perf_counter() - start
        del ds
        return rows, seconds, {"load_s": round(loaded - start, 3)}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def experiment_yaml(data: Path, out: Path, scratch: Path, max_length: int) -> str:
    """The smallest experiment whose data stage matches experiments/sst2_minilm_lora.yaml."""
    import yaml

    raw = {
        "name": "bench-preprocess",
        "output_dir": str(out),
        "data": {
            "path": str(data),
            "text_column": "sentence",
            "label_column": "label",
            "split": {"validation": 0.05, "test": 0.05, "seed": 42},
            "max_length": max_length,
        },
        "model": {"name": "minilm"},
        "tune": {"enabled": False},
        "tracking": {
            "tracking_uri": f"sqlite:///{scratch}/mlflow.db",
            "artifact_location": str(scratch / "artifacts"),
        },
    }
    return yaml.safe_dump(raw, sort_keys=False)


def lepton_once(data: Path, out: Path, scratch: Path, max_length: int) -> tuple[int, float, dict]:
    """The whole data stage into a new folder; (rows read, seconds, manifest)."""
    from lepton_ray import config
    from lepton_ray.data.preprocess import run_preprocess

    load = getattr(config, "load_config", None) or config.load_experiment
    path = scratch / f"{out.name}.yaml"
    path.write_text(experiment_yaml(data, out, scratch, max_length))
    cfg = load(path)
    kwargs = {"force": True} if "force" in inspect.signature(run_preprocess).parameters else {}
    lines: list[str] = []
    try:
        start = time.perf_counter()
        manifest = run_preprocess(cfg, log=lines.append, **kwargs)
        seconds = time.perf_counter() - start
    except BaseException:
        print("\n".join(lines), file=sys.stderr)
        raise
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if manifest.get("reused"):
        sys.exit(f"lepton-ray reused cached shards in {out}: that run measured nothing")
    return int(manifest["rows_read"]), seconds, manifest


# ----------------------------------------------------------------------------------- machine
def cpu_flags() -> list[str]:
    """The CPU flags that decide tokenizer and Arrow speed (vector extensions)."""
    try:
        line = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
        )
    except (OSError, StopIteration):
        return []
    wanted = ("avx", "sse4", "amx", "vnni", "bmi2", "fma")
    return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(wanted))


def git_modified() -> list[str]:
    """Files that differ from the recorded git SHA: what was measured is HEAD plus these."""
    import subprocess

    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", "lepton_ray"],
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    return [line[3:] for line in status.splitlines()]


def versions() -> dict[str, str]:
    import datasets
    import psutil
    import pyarrow
    import tokenizers
    import transformers

    return {
        "datasets": datasets.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "pyarrow": pyarrow.__version__,
        "psutil": psutil.__version__,
    }


# -------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SST-2 train.tsv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray"
    )
    parser.add_argument("--no-warmup", action="store_true", help="time the first calls too")
    args = parser.parse_args()

    data = args.data.expanduser().resolve()
    if not data.is_file():
        sys.exit(
            f"skipped: {data} is absent (the benchmark reads SST-2 from ../shared/data; "
            "pass --data PATH/train.tsv)"
        )
    try:
        import psutil  # noqa: F401
    except ImportError:
        sys.exit("this benchmark samples memory with psutil: pip install psutil")

    # A private Ray: its own temp folder (so no other cluster is found), loopback only.
    scratch = Path(tempfile.mkdtemp(prefix="lrb-", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(scratch)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("RAY_ADDRESS", None)
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM", "unset (tokenizers default: on)")

    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()

    from lepton_ray.artifacts import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    sampler = MemorySampler()
    runs: dict[str, list[dict]] = {"baseline": [], "lepton": []}
    first: dict[str, dict] = {}
    manifest: dict = {}
    try:
        import ray

        from lepton_ray.runtime.cluster import worker_env

        start = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": worker_env()},
            logging_level="WARNING",
        )
        ray_startup = time.perf_counter() - start
        time.sleep(2)  # let the start-up's idle workers settle before measuring them
        idle = sampler.snapshot()
        print(
            f"Ray up in {ray_startup:.1f} s ({args.num_cpus} CPUs); idle Ray processes: "
            f"RSS {idle['ray_rss']:.0f} MB, PSS {idle['ray_pss']:.0f} MB",
            flush=True,
        )

        counter = iter(range(10_000))

        def run(side: str, memory: bool) -> dict:
            # Memory is sampled on the warm-up call only: reading /proc/PID/smaps of every
            # Ray process costs CPU that the timed repeats must not pay.
            gc.collect()
            before = sampler.snapshot()
            sampler.peak = {}
            with sampler if memory else contextlib.nullcontext():
                if side == "baseline":
                    rows, seconds, parts = baseline_once(data, tokenizer, args.max_length, scratch)
                else:
                    out = scratch / "out" / f"run{next(counter)}"
                    rows, seconds, result = lepton_once(data, out, scratch, args.max_length)
                    parts = {}
                    manifest.clear()
                    manifest.update(result)
            record = {
                "rows": rows,
                "seconds": round(seconds, 3),
                "rows_per_s": round(rows / seconds, 1),
                **parts,
                "peak_mb": {k: round(v, 1) for k, v in sampler.peak.items()},
                "before_mb": {k: round(v, 1) for k, v in before.items()},
            }
            print(f"  {side:<8} {rows:>7,} rows in {seconds:6.2f} s", flush=True)
            return record

        if not args.no_warmup:
            print("warm-up", flush=True)
            for side in runs:
                first[side] = run(side, memory=True)
        for i in range(args.repeats):
            print(f"repeat {i + 1}/{args.repeats}", flush=True)
            for side in runs:
                runs[side].append(run(side, memory=args.no_warmup))
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            time.sleep(1)
            shutil.rmtree(scratch, ignore_errors=True)

    def peak(side: str, key: str) -> float:
        measured = [first[side]] if side in first else runs[side]
        return max(r["peak_mb"][key] for r in measured)

    rates = {side: statistics.median(r["rows_per_s"] for r in runs[side]) for side in runs}
    seconds = {side: statistics.median(r["seconds"] for r in runs[side]) for side in runs}
    peaks = {
        # The baseline works in this process alone; Ray idles meanwhile (reported apart).
        "baseline": {"rss": peak("baseline", "driver_rss"), "pss": peak("baseline", "driver_pss")},
        "lepton": {"rss": peak("lepton", "total_rss"), "pss": peak("lepton", "total_pss")},
    }
    info = machine() | versions()
    info["cpu_flags"] = cpu_flags()
    info["git_modified"] = git_modified()
    result = {
        "machine": info,
        "data": str(data),
        "max_length": args.max_length,
        "tokenizer": "minilm",
        "ray_num_cpus": args.num_cpus,
        "ray_startup_s": round(ray_startup, 2),
        "ray_idle_mb": {"rss": round(idle["ray_rss"], 1), "pss": round(idle["ray_pss"], 1)},
        "tokenizers_parallelism_baseline": parallelism,
        "warmup": not args.no_warmup,
        "repeats": args.repeats,
        "what": {
            "baseline": "datasets.load_dataset('csv', delimiter='\\t') + .map(tokenize, "
            "batched=True), one process, fresh cache folder, keep_in_memory=True; no writes",
            "lepton": "lepton_ray.data.preprocess.run_preprocess: read, clean, dedup, split, "
            "tokenize, write Parquet + manifest; Ray started beforehand (excluded)",
        },
        "first_call": first,
        "runs": runs,
        "median_rows_per_s": rates,
        "median_seconds": seconds,
        "ratio_lepton_over_baseline": round(rates["lepton"] / rates["baseline"], 3),
        "peak_mb": peaks,
        "lepton_manifest": {
            k: manifest.get(k)
            for k in ("rows_read", "kept", "dropped", "augmented", "splits", "seconds", "timings")
        },
    }
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = write(f"preprocess-{date}", result)

    n_rows = runs["baseline"][0]["rows"]
    print(
        f"\nSST-2 train ({n_rows:,} rows), tokenizer minilm, max_length {args.max_length}; "
        f"{info['cpu']}, {info['nproc']} cores; ray {info['ray']}, datasets "
        f"{info['datasets']}, torch {info['torch']}\n"
    )
    print("| side | median s | median rows/s | first call s | peak RSS MB | peak PSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    names = {
        "baseline": "datasets load + map(batched), 1 process",
        "lepton": f"lepton-ray run_preprocess, Ray {args.num_cpus} CPUs",
    }
    for side in runs:
        warm = f"{first[side]['seconds']:.1f}" if side in first else "-"
        print(
            f"| {names[side]} | {seconds[side]:.1f} | {rates[side]:,.0f} | {warm} | "
            f"{peaks[side]['rss']:,.0f} | {peaks[side]['pss']:,.0f} |"
        )
    print(
        f"\nlepton / baseline rows/s: {result['ratio_lepton_over_baseline']:.2f}x "
        f"(median of {args.repeats}, alternating, "
        f"{'after a warm-up' if first else 'no warm-up'}); Ray start-up {ray_startup:.1f} s "
        f"excluded; idle Ray processes RSS {idle['ray_rss']:,.0f} MB (PSS "
        f"{idle['ray_pss']:,.0f}) not in the baseline's peak.\n"
        f"lepton-ray also cleans, deduplicates ({json.dumps(manifest.get('dropped', {}))}), "
        f"splits and writes Parquet; the baseline only loads and tokenizes.\n"
        f"Full numbers: {path}"
    )


if __name__ == "__main__":
    main()
