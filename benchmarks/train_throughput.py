"""Training throughput: lepton-ray's loop (bare and through Ray Train) against HF `Trainer`.

    .venv/bin/python benchmarks/train_throughput.py --rows 3200
    .venv/bin/python benchmarks/train_throughput.py --rows 256 --max-steps 3 --repeats 1  # smoke

MiniLM-L6 (``model.name: minilm``) + LoRA r=8 (alpha 16, dropout 0.1, query/value), SST-2
train (the first ``--rows`` rows of ``../shared/data/sst2/train.tsv``), max length 128, batch
32, lr 5e-4, ``--epochs`` 1, 2 torch threads. The data is preprocessed once
(``run_preprocess`` on a private local Ray with 2 CPUs) and every side trains on the same
rows of that train Parquet:

* ``hf``: ``transformers.Trainer`` with its default collator (``DataCollatorWithPadding``:
  dynamic padding), random sampler, the same model and ``peft.get_peft_model`` LoRA, fp32,
  CPU, no evaluation, no saving; timed from ``on_train_begin`` to ``on_train_end``;
* ``loop-PREC[-glen]``: ``train_standalone`` in this process (``train.precision`` PREC,
  ``train.group_by_length`` on with ``-glen``), timed by the loop's own ``train_seconds``;
* ``ray1x2-PREC[-glen]``: ``run_train`` on Ray Train, 1 worker x 2 CPUs (2 threads);
* ``ray2x1-PREC[-glen]``: ``run_train``, 2 DDP workers x 1 CPU (1 thread each); the global
  batch stays 32 (16 per worker) unless ``--ddp-batch per-worker``.

Variants run in the order given, ``--repeats`` rounds (median reported), after a short
warm-up of the bare loop in this process (``--warmup-steps``; Ray workers start cold).
Reported: samples/s and real (non-padding) tokens/s of the training steps only, the ratio
to ``hf``, the Ray variants' slowdown against the bare loop with the same settings, and the
wall time of each call (model loading, evaluation, checkpoints, Ray start-up included).
Results go to ``benchmarks/results/train_throughput-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
VARIANT = re.compile(r"^(hf|loop|ray1x2|ray2x1)(?:-(fp32|bf16|auto))?(-glen)?$")
DEFAULT_VARIANTS = (
    "hf,loop-fp32,loop-fp32-glen,loop-bf16,loop-bf16-glen,ray1x2-fp32-glen,ray2x1-fp32-glen"
)


def log(line: str) -> None:
    print(line, flush=True)


def need_data(path: Path) -> Path:
    if not path.is_file():
        sys.exit(f"skipped: {path} is absent (the benchmark reads ../shared/data; --data-root)")
    return path


@contextlib.contextmanager
def private_ray(num_cpus: int = 2, keep: bool = False, dashboard: bool = True):
    """A local Ray of our own (own RAY_TMPDIR, loopback only); yields a scratch folder.

    Started as ``lepton_ray.runtime.init_ray`` starts one in-process: with the dashboard on a
    free loopback port, whose State API Ray Train's placement-group cleaner queries (without
    it, or with another Ray on the machine, the cleaner's thread dies with a traceback).
    """
    scratch = Path(tempfile.mkdtemp(prefix="lrt-tb-", dir="/tmp"))
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS"):
        os.environ.pop(key, None)
    os.environ.update(RAY_TMPDIR=str(scratch), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    for key, value in (
        ("RAY_AUTH_MODE", "disabled"),
        ("RAY_TRAIN_V2_ENABLED", "1"),
        ("HF_HUB_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)
    import ray

    from lepton_ray.runtime.cluster import free_port, worker_env

    port = free_port() if dashboard else None
    api = f"http://127.0.0.1:{port}" if dashboard else None
    if api:
        os.environ["RAY_API_SERVER_ADDRESS"] = api
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        **({"dashboard_host": "127.0.0.1", "dashboard_port": port} if dashboard else {}),
        runtime_env={"env_vars": worker_env(api)},
        logging_level="WARNING",
    )
    try:
        yield scratch
    finally:
        ray.shutdown()
        time.sleep(1)
        log(f"kept {scratch}") if keep else shutil.rmtree(scratch, ignore_errors=True)


def experiment(tmp: Path, data: dict, train: dict, peft: dict, scaling: dict | None = None):
    """A validated config: no sweep, compression or serving; MLflow and outputs in ``tmp``."""
    from lepton_ray.config import validate_experiment

    raw = {
        "name": "bench-train",
        "output_dir": str(tmp / "outputs"),
        "data": data,
        "model": {"name": "minilm"},
        "peft": peft,
        "train": train,
        "scaling": scaling or {"num_workers": 1, "resources_per_worker": {"CPU": 2}},
        "tune": {"enabled": False},
        "compress": {"enabled": False},
        "serve": {"enabled": False},
        "tracking": {
            "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
            "artifact_location": str(tmp / "artifacts"),
        },
        "cluster": {"storage_path": str(tmp / "storage")},
    }
    return validate_experiment(raw, source="benchmark")


def rates(history: list[dict], tokens_per_row: float) -> dict:
    """Samples/s, real tokens/s and seconds over every evaluation window of a loop's history.

    Tokens are estimated (rows x mean length of the train split) if the loop reports none.
    """
    if not (history and all("train_seconds" in h for h in history)):
        sps = statistics.mean(h["train_samples_per_s"] for h in history)
        return {
            "samples_per_s": sps,
            "tokens_per_s": sps * tokens_per_row,
            "train_seconds": None,
            "tokens_estimated": True,
        }
    seconds = sum(h["train_seconds"] for h in history)
    rows = sum(h["train_samples_per_s"] * h["train_seconds"] for h in history)
    exact = all("train_tokens_per_s" in h for h in history)
    tokens = sum(h.get("train_tokens_per_s", 0) * h["train_seconds"] for h in history)
    tokens = tokens if exact else rows * tokens_per_row
    return {
        "samples_per_s": rows / seconds,
        "tokens_per_s": tokens / seconds,
        "train_seconds": seconds,
        "rows": round(rows),
        "tokens_estimated": not exact,
        "padding_fraction": history[-1].get("padding_fraction"),
    }


THROUGHPUT_KEYS = ("train_samples_per_s", "train_tokens_per_s", "train_seconds", "padding_fraction")


def ray_history(cfg, result: dict, keys: tuple[str, ...] = THROUGHPUT_KEYS) -> list[dict]:
    """Every evaluation's metrics ``keys`` of a Ray run, from its MLflow run."""
    from lepton_ray.tracking.mlflow import client

    c = client(cfg.tracking.tracking_uri)
    series = {k: {m.step: m.value for m in c.get_metric_history(result["run_id"], k)} for k in keys}
    steps = sorted(series[keys[0]])
    return [{k: series[k][s] for k in keys if s in series[k]} for s in steps] or [result["metrics"]]


def wait_for_cpus(seconds: float = 60.0) -> None:
    """Let Ray give back the CPUs of the last stage (actors, placement groups) first."""
    import ray

    deadline = time.time() + seconds
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.5)
    log(f"[bench] warning: Ray still holds CPUs: {ray.available_resources()}")


class TrainRows:
    """The train Parquet as a torch dataset for `Trainer` (its collator pads the ids)."""

    def __init__(self, frame):
        self.ids = [list(map(int, x)) for x in frame["input_ids"]]
        self.labels = [int(x) for x in frame["label_id"]]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "label": self.labels[i]}


def run_hf(args, frame, labels: list[str], out: Path) -> dict:
    import dataclasses

    import torch
    import transformers as tf
    from peft import LoraConfig, TaskType, get_peft_model

    from lepton_ray.config import resolve_model_path

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    path = resolve_model_path("minilm")
    tf.set_seed(42)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=8,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=["query", "value"],
        ),
    )

    class Clock(tf.TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % 10 == 0:
                rate = state.global_step * args.batch / (time.perf_counter() - self.start)
                log(f"[hf] step {state.global_step}/{state.max_steps} {rate:.1f} samples/s")

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

    fields = {f.name for f in dataclasses.fields(tf.TrainingArguments)}
    random_order = (
        {"group_by_length": False}
        if "group_by_length" in fields
        else {"train_sampling_strategy": "random"}
    )
    targs = tf.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps * args.epochs if args.max_steps else -1,
        learning_rate=args.lr,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        max_grad_norm=1.0,
        seed=42,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        **random_order,  # real tokens: mask sums
    )
    clock, rows = Clock(), TrainRows(frame)
    trainer = tf.Trainer(
        model=model, args=targs, train_dataset=rows, processing_class=tokenizer, callbacks=[clock]
    )
    output = trainer.train()
    # Every row once per epoch; with --max-steps, full batches (smoke sizes fit in an epoch).
    n = len(rows) * args.epochs
    n = min(n, trainer.state.global_step * args.batch) if args.max_steps else n
    tokens = trainer.state.num_input_tokens_seen
    return {
        "samples_per_s": n / clock.seconds,
        "tokens_per_s": tokens / clock.seconds,
        "train_seconds": clock.seconds,
        "rows": n,
        "tokens": tokens,
        "tokens_estimated": False,
        "trainer_train_runtime": output.metrics.get("train_runtime"),
        "wall_s": time.perf_counter() - started,
    }


def variant_config(args, tmp: Path, kind: str, precision: str, glen: bool):
    data = {
        "path": str(args.data),
        "text_column": "sentence",
        "label_column": "label",
        "max_rows": args.rows,
        "max_length": args.max_length,
        "split": {"validation": args.validation, "test": 0.0, "seed": 42},
    }
    peft = {
        "method": "lora",
        "lora": {
            "r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.1,
            "target_modules": ["query", "value"],
        },
    }
    workers = 2 if kind == "ray2x1" else 1
    cpus = max(1, args.threads // workers)
    train = {
        "epochs": args.epochs,
        "lr": args.lr,
        "warmup_ratio": 0.1,
        "precision": precision,
        "group_by_length": glen,
        "torch_threads": cpus,
        "seed": 42,
        "max_steps_per_epoch": args.max_steps,
    }
    ddp_global = workers > 1 and args.ddp_batch == "global"
    train["global_batch_size" if ddp_global else "batch_size"] = args.batch
    scaling = {"num_workers": workers, "resources_per_worker": {"CPU": cpus}}
    return experiment(tmp, data, train, peft, scaling)


def run_variant(name: str, args, tmp: Path, manifest: dict, frame, tokens_per_row: float, i=0):
    kind, precision, glen = VARIANT.match(name).groups()
    if kind == "hf":
        return run_hf(args, frame, manifest["labels"], tmp / f"hf-{i}")
    cfg = variant_config(args, tmp, kind, precision or "fp32", bool(glen))
    started = time.perf_counter()
    if kind == "loop":
        from lepton_ray.train.standalone import train_standalone

        history = train_standalone(cfg, manifest, tmp / f"{name}-{i}", log=log)["history"]
    else:
        from lepton_ray.train.driver import run_train

        wait_for_cpus()
        history = ray_history(cfg, run_train(cfg, manifest, log=log, new=True))
    return {**rates(history, tokens_per_row), "wall_s": time.perf_counter() - started}


def machine_facts() -> dict:
    """``common.machine()`` plus the CPU's vector units and whether bf16 is native."""
    from lepton_ray.hardware import cpu_features

    return {**machine(), "cpu_features": cpu_features().describe()}


def save(result: dict, out: Path | None, stem: str) -> Path:
    """``--out`` if given, else ``benchmarks/results/STEM-<date>.json``."""
    if out is None:
        return write(f"{stem}-{datetime.now(timezone.utc):%Y-%m-%d}", result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=SHARED, help="holds sst2/train.tsv")
    parser.add_argument("--rows", type=int, default=3200, help="first N rows of train.tsv")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--validation", type=float, default=0.05, help="validation fraction")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPUs) per side")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated")
    parser.add_argument("--skip-hf", action="store_true", help="drop the hf baseline")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the variants")
    parser.add_argument("--warmup-steps", type=int, default=5, help="0: no warm-up")
    parser.add_argument("--ddp-batch", choices=["global", "per-worker"], default="global")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch (smoke)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-dashboard", action="store_true", help="Ray without dashboard")
    args = parser.parse_args()

    args.data = need_data(args.data_root.expanduser().resolve() / "sst2" / "train.tsv")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = [v for v in variants if not (args.skip_hf and v == "hf")]
    bad = [v for v in variants if not VARIANT.match(v) or (v.startswith("hf") and v != "hf")]
    if bad or not variants:
        sys.exit(f"unknown variant(s) {bad}; e.g. hf, loop-fp32, loop-bf16-glen, ray1x2-fp32-glen")

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with private_ray(2, args.keep, not args.no_dashboard) as tmp:
        import pandas as pd

        from lepton_ray.data.preprocess import run_preprocess

        cfg = variant_config(args, tmp, "loop", "fp32", True)
        manifest = run_preprocess(cfg, log=log, force=True)
        frame = pd.read_parquet(cfg.data_dir / "train", columns=["input_ids", "label_id", "length"])
        tokens_per_row = float(frame["length"].mean())
        log(f"[bench] {len(frame)} train rows, {int(frame['length'].sum())} real tokens")
        if args.warmup_steps:
            log(f"[bench] warm-up: {args.warmup_steps} steps of the bare loop")
            warm = argparse.Namespace(**{**vars(args), "max_steps": args.warmup_steps})
            run_variant("loop-fp32", warm, tmp, manifest, frame, tokens_per_row, i=-1)
        for i in range(args.repeats):
            for name in variants:
                log(f"[bench] round {i + 1}/{args.repeats}: {name}")
                record = run_variant(name, args, tmp, manifest, frame, tokens_per_row, i)
                runs[name].append(record)
                log(
                    f"[bench] {name}: {record['samples_per_s']:.1f} samples/s, "
                    f"{record['tokens_per_s']:.0f} tokens/s, wall {record['wall_s']:.1f} s"
                )

    med = {
        v: {
            k: statistics.median(r[k] for r in rs)
            for k in ("samples_per_s", "tokens_per_s", "wall_s")
        }
        for v, rs in runs.items()
    }
    for v, m in med.items():
        hf = med.get("hf")
        m["x_hf_samples"] = m["samples_per_s"] / hf["samples_per_s"] if hf else None
        m["x_hf_tokens"] = m["tokens_per_s"] / hf["tokens_per_s"] if hf else None
        bare = med.get(re.sub(r"^ray\dx\d", "loop", v)) if v.startswith("ray") else None
        m["ray_slower_pct"] = (
            100 * (1 - m["samples_per_s"] / bare["samples_per_s"]) if bare else None
        )
        m["ray_wall_slower_pct"] = 100 * (m["wall_s"] / bare["wall_s"] - 1) if bare else None
    info = machine_facts()
    result = {
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_rows": len(frame),
        "train_real_tokens": int(frame["length"].sum()),
        "manifest": {k: manifest.get(k) for k in ("rows_read", "kept", "dropped", "splits")},
        "runs": runs,
        "median": med,
    }
    path = save(result, args.out, "train_throughput")

    print(
        f"\nMiniLM-L6 + LoRA r=8, SST-2 first {args.rows} rows ({len(frame)} train rows), "
        f"batch {args.batch}, max_length {args.max_length}, {args.epochs} epoch(s)"
        f"{f', {args.max_steps} steps/epoch' if args.max_steps else ''}; {info['cpu']}, "
        f"{info['nproc']} cores; torch {info['torch']}, ray {info['ray']}; median of "
        f"{args.repeats}\n"
    )
    print(
        "| variant | samples/s | real tokens/s | x HF (samples) | x HF (tokens) "
        "| Ray slower than bare loop | wall s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v, m in med.items():

        def fmt(x, spec):
            return "-" if x is None else format(x, spec)

        ray = (
            f"{fmt(m['ray_slower_pct'], '+.1f')}% (wall {fmt(m['ray_wall_slower_pct'], '+.0f')}%)"
            if m["ray_slower_pct"] is not None
            else "-"
        )
        print(
            f"| {v} | {m['samples_per_s']:.1f} | {m['tokens_per_s']:,.0f} | "
            f"{fmt(m['x_hf_samples'], '.2f')} | {fmt(m['x_hf_tokens'], '.2f')} | {ray} | "
            f"{m['wall_s']:.1f} |"
        )
    print(f"\nFull numbers: {path}")


if __name__ == "__main__":
    main()
