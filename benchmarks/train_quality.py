"""Fine-tuning quality: test accuracy and training time of lepton-ray's loop on real data.

    .venv/bin/python benchmarks/train_quality.py                          # full FT, SST-2
    .venv/bin/python benchmarks/train_quality.py --peft lora --rank 8 --lr 5e-4
    .venv/bin/python benchmarks/train_quality.py --dataset trec --epochs 3
    .venv/bin/python benchmarks/train_quality.py --ray --workers 2         # through Ray Train
    .venv/bin/python benchmarks/train_quality.py --rows 256 --max-steps 3 --epochs 1  # smoke

MiniLM-L6 (``model.name: minilm``) fine-tuned on the whole train file, as in
``experiments/sst2_minilm_lora.yaml`` / ``trec_minilm_lora.yaml``: validation (which picks
the best epoch) is cut from train, the test split is the official held-out file (SST-2:
GLUE ``dev.tsv``, 872 rows; TREC: ``TREC_10``, 500 rows, 6 coarse labels). Defaults: full
fine-tuning (``--peft none``), lr 5e-5, batch 32, 2 epochs, linear schedule with 6 % warm-up,
length-grouped batches, evaluation every epoch, 2 torch threads, ``train_standalone`` in this
process (``--ray``: ``run_train`` on a private Ray, ``--workers`` x ``threads/workers`` CPUs,
same global batch). The best checkpoint is then loaded (``load_model_artifact``) and scored
on the test Parquet with ``lepton_ray.tasks.classification_eval.evaluate``.

``--max-minutes`` sets a time budget: a short probe of the bare loop measures samples/s and
the per-epoch overhead, and only if the epochs would not fit is ``train.max_steps_per_epoch``
capped (each epoch then trains on the first batches of its shuffled order; Ray start-up
is not budgeted). Reported: test accuracy and macro-F1, validation metrics per epoch,
training wall time (model loading, evaluations and checkpoints included) and the loop's own
train seconds. Results go to
``benchmarks/results/train_quality-<dataset>-<date>.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import (  # noqa: E402
    SHARED,
    experiment,
    log,
    machine_facts,
    need_data,
    private_ray,
    ray_history,
    save,
    wait_for_cpus,
)

DATASETS = {  # as experiments/sst2_minilm_lora.yaml and trec_minilm_lora.yaml
    "sst2": {
        "train": "sst2/train.tsv",
        "test": "sst2/dev.tsv",
        "text": "sentence",
        "label": "label",
        "validation": 0.05,
        "max_length": 64,
        "contamination": "remove",
        "extra": {"dedup": {"exact": True, "conflicts": "majority"}},
    },
    "trec": {
        "train": "trec/train.tsv",
        "test": "trec/test.tsv",
        "text": "text",
        "label": "coarse_label",
        "validation": 0.1,
        "max_length": 48,
        "contamination": "report",
        "extra": {},
    },
}
HISTORY_KEYS = (
    "epoch",
    "step",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "train_seconds",
    "train_samples_per_s",
    "train_tokens_per_s",
)


def build(args, tmp: Path, max_steps: int | None, epochs: int | None = None):
    d = DATASETS[args.dataset]
    split = {
        "validation": d["validation"],
        "seed": 42,
        "contamination": d["contamination"],
        "files": {"test": str(args.data_root / d["test"])},
    }
    data = {
        "path": str(args.data_root / d["train"]),
        "text_column": d["text"],
        "label_column": args.label_column or d["label"],
        "split": split,
        "max_length": args.max_length or d["max_length"],
        "max_rows": args.rows,
        **d["extra"],
    }
    peft = {"method": args.peft}
    if args.peft == "lora":
        peft["lora"] = {
            "r": args.rank,
            "lora_alpha": args.alpha or 2 * args.rank,
            "lora_dropout": 0.1,
            "target_modules": args.targets.split(","),
        }
    workers = args.workers if args.ray else 1
    cpus = max(1, args.threads // workers)
    train = {
        "epochs": epochs or args.epochs,
        "lr": args.lr,
        "lr_schedule": args.schedule,
        "warmup_ratio": args.warmup,
        "precision": args.precision,
        "group_by_length": not args.no_group_by_length,
        "torch_threads": cpus,
        "max_steps_per_epoch": max_steps,
        "seed": args.seed,
    }
    train["global_batch_size" if workers > 1 else "batch_size"] = args.batch
    scaling = {"num_workers": workers, "resources_per_worker": {"CPU": cpus}}
    return experiment(tmp, data, train, peft, scaling)


def budget_steps(args, tmp: Path, manifest: dict) -> dict:
    """Probe the bare loop; cap steps per epoch only if the epochs would overrun the budget."""
    from lepton_ray.train.standalone import train_standalone

    cfg = build(args, tmp, max_steps=args.probe_steps, epochs=1)
    log(f"[bench] budget probe: {args.probe_steps} steps of the bare loop")
    started = time.perf_counter()
    last = train_standalone(cfg, manifest, tmp / "probe", log=log)["history"][-1]
    overhead = max(0.0, time.perf_counter() - started - last.get("train_seconds", 0.0))
    rate = last["train_samples_per_s"]
    natural = math.ceil(manifest["splits"]["train"] / args.batch)
    train_s = args.max_minutes * 60 - overhead * args.epochs
    fit = max(1, int(train_s * rate / args.batch / args.epochs))
    cap = fit if fit < natural else None
    log(
        f"[bench] probe: {rate:.1f} samples/s, {overhead:.0f} s overhead per epoch; "
        + (f"capping at {cap} of {natural} steps per epoch" if cap else "the epochs fit")
    )
    return {
        "probe_samples_per_s": rate,
        "overhead_s_per_epoch": overhead,
        "steps_per_epoch": natural,
        "max_steps_per_epoch": cap,
    }


def train(args, cfg, manifest: dict, tmp: Path) -> tuple[list[dict], Path, float]:
    """Train; (history of evaluations, folder of the best model, wall seconds)."""
    started = time.perf_counter()
    if not args.ray:
        from lepton_ray.train.standalone import train_standalone

        result = train_standalone(cfg, manifest, tmp / "standalone", log=log)
        return result["history"], Path(result["model_dir"]), time.perf_counter() - started
    import mlflow.artifacts

    from lepton_ray.train.driver import run_train

    wait_for_cpus()
    result = run_train(cfg, manifest, log=log, new=True)
    wall = time.perf_counter() - started
    folder = mlflow.artifacts.download_artifacts(  # the tracker logs each new best as "model"
        run_id=result["run_id"],
        artifact_path="model",
        dst_path=str(tmp / "ray-model"),
        tracking_uri=cfg.tracking.tracking_uri,
    )
    return ray_history(cfg, result, HISTORY_KEYS), Path(folder), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="sst2")
    p.add_argument("--data-root", type=Path, default=SHARED, help="holds sst2/ and trec/")
    p.add_argument("--label-column", default=None, help="e.g. fine_label for TREC-50")
    p.add_argument("--peft", choices=["none", "lora"], default="none")
    p.add_argument("--rank", type=int, default=8, help="LoRA r")
    p.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--targets", default="query,value", help="LoRA target modules")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="default 5e-5 (none), 5e-4 (lora)")
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup", type=float, default=0.06, help="warm-up fraction of steps")
    p.add_argument("--no-group-by-length", action="store_true")
    p.add_argument("--max-length", type=int, default=None, help="default: 64 SST-2, 48 TREC")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPUs) in all")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--ray", action="store_true", help="train through Ray Train (run_train)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (with --ray)")
    p.add_argument("--rows", type=int, default=None, help="first N rows of train (smoke)")
    p.add_argument("--max-steps", type=int, default=None, help="steps per epoch (smoke)")
    p.add_argument("--max-minutes", type=float, default=None, help="training time budget")
    p.add_argument("--probe-steps", type=int, default=20, help="steps of the budget probe")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="result JSON path")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--no-dashboard", action="store_true", help="Ray without dashboard")
    args = p.parse_args()
    args.data_root = args.data_root.expanduser().resolve()
    for key in ("train", "test"):
        need_data(args.data_root / DATASETS[args.dataset][key])
    args.lr = args.lr or (5e-5 if args.peft == "none" else 5e-4)
    if args.ray and args.batch % args.workers:
        sys.exit(f"--batch {args.batch} does not divide across {args.workers} workers")

    with private_ray(args.threads, args.keep, not args.no_dashboard) as tmp:
        import pandas as pd
        import torch

        from lepton_ray.compress.formats import load_model_artifact
        from lepton_ray.data.preprocess import run_preprocess
        from lepton_ray.tasks import get_task
        from lepton_ray.tasks.classification_eval import evaluate

        cfg = build(args, tmp, args.max_steps)
        manifest = run_preprocess(cfg, log=log, force=True)
        budget = budget_steps(args, tmp, manifest) if args.max_minutes else None
        if budget and budget["max_steps_per_epoch"]:
            cfg = build(args, tmp, budget["max_steps_per_epoch"])
        how = f"Ray Train {args.workers} worker(s)" if args.ray else "bare loop"
        log(f"[bench] training: {args.peft} on {args.dataset}, {how}, {args.epochs} epoch(s)")
        history, model_dir, wall = train(args, cfg, manifest, tmp)

        model, tokenizer, meta = load_model_artifact(model_dir)
        if list(meta.labels) != list(manifest["labels"]):
            sys.exit(f"labels differ: model {meta.labels} vs data {manifest['labels']}")
        test = pd.read_parquet(cfg.data_dir / "test")
        torch.set_num_threads(args.threads)
        started = time.perf_counter()
        batches = get_task(meta.task).frame_batches(
            test, args.eval_batch, tokenizer.pad_token_id or 0
        )
        scores = evaluate(model, batches, len(meta.labels))
        eval_s = time.perf_counter() - started

    best = max(history, key=lambda h: h.get("val_accuracy", float("-inf")))
    train_s = sum(h.get("train_seconds", 0.0) for h in history) or None
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {
        "machine": machine_facts(),
        "settings": settings,
        "method": how,
        "config_train": cfg.train.model_dump(mode="json"),
        "peft": cfg.peft.model_dump(),
        "manifest": {
            k: manifest.get(k)
            for k in ("rows_read", "kept", "dropped", "splits", "labels", "contamination")
        },
        "budget": budget,
        "history": history,
        "best_validation": best,
        "train_wall_s": wall,
        "train_loop_s": train_s,
        "test_eval_s": eval_s,
        "test": {k: scores[k] for k in ("accuracy", "macro_f1", "loss", "examples", "confusion")},
    }
    path = save(result, args.out, f"train_quality-{args.dataset}")

    method = (
        "full fine-tuning"
        if args.peft == "none"
        else (f"LoRA r={args.rank} alpha={args.alpha or 2 * args.rank} on {args.targets}")
    )
    print(
        f"\nMiniLM-L6 {method} on {args.dataset} ({manifest['splits']['train']} train, "
        f"{manifest['splits']['validation']} validation, {len(test)} test rows); lr "
        f"{args.lr:g}, batch {args.batch}, {args.epochs} epoch(s), precision {args.precision}, "
        f"{how}; {result['machine']['cpu']}, {result['machine']['nproc']} cores\n"
    )
    print("| epoch | step | train loss | val loss | val accuracy | val macro-F1 | train s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for h in history:
        print(
            f"| {h.get('epoch', 0):.2f} | {h.get('step', 0):.0f} | {h.get('train_loss', 0):.4f} "
            f"| {h.get('val_loss', 0):.4f} | {h.get('val_accuracy', 0):.4f} | "
            f"{h.get('val_macro_f1', 0):.4f} | {h.get('train_seconds', 0):.1f} |"
        )
    loop = f"{train_s:.0f} s in training steps; " if train_s else ""
    print(
        f"\ntest accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f} "
        f"({scores['examples']} rows, best epoch {best.get('epoch', 0):.2f}); training wall "
        f"time {wall:.0f} s ({loop}model loading, evaluation and checkpoints included)\n"
        f"Full numbers: {path}"
    )


if __name__ == "__main__":
    main()
