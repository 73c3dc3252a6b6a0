"""``run_compress``: merge LoRA into the base, quantize to int8, measure what it cost."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.evaluation import evaluate, frame_batches
from lepton_ray.models import (
    INT8_WEIGHTS,
    ModelMeta,
    folder_size_mb,
    load_model_artifact,
    quantize_dynamic_int8,
    save_int8_artifact,
)


def evaluate_split(
    model, tokenizer, cfg: ExperimentConfig, split: str, num_labels: int
) -> dict[str, Any] | None:
    """Metrics and throughput on one preprocessed split (None when the split is empty)."""
    import pandas as pd
    import torch

    folder = cfg.data_dir / split
    if not folder.exists():
        return None
    frame = pd.read_parquet(folder)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    result = evaluate(
        model,
        frame_batches(frame, cfg.train.eval_batch_size, tokenizer.pad_token_id or 0),
        num_labels,
    )
    result["samples_per_s"] = len(frame) / (time.perf_counter() - started)
    return result


@dataclass
class CompressResult:
    method: str
    folder: Path | None  # the compressed artifact; None when the accuracy gate refused it
    accepted: bool
    reason: str
    metrics: dict[str, float]


def run_compress(
    cfg: ExperimentConfig, model_dir: Path, out: Path, run_id: str, log=print
) -> CompressResult:
    """Compress the artifact in ``model_dir`` into ``out``; log before/after metrics to ``run_id``.

    A compression whose validation accuracy drops more than ``compress.max_drop`` points
    is refused (``accepted`` False, no folder): the uncompressed model is kept.
    """
    from lepton_ray.tracking import plots
    from lepton_ray.tracking.mlflow import log_figure, log_folder, log_metrics

    uri = cfg.tracking.tracking_uri
    model, tokenizer, meta = load_model_artifact(model_dir, merge=True)
    labels = meta.labels
    fp32_dir = out / "fp32"
    model.save_pretrained(fp32_dir, safe_serialization=True)
    metrics: dict[str, float] = {"size_mb_fp32": folder_size_mb(fp32_dir, "*.safetensors")}
    log(
        f"[compress] merged {meta.peft_method} adapter into the base: {metrics['size_mb_fp32']:.1f} MB fp32"
    )

    before = {
        s: evaluate_split(model, tokenizer, cfg, s, len(labels)) for s in ("validation", "test")
    }
    qmodel = quantize_dynamic_int8(model)
    after = {
        s: evaluate_split(qmodel, tokenizer, cfg, s, len(labels)) for s in ("validation", "test")
    }

    int8_dir = out / "int8"
    int8_meta = ModelMeta(
        task=meta.task,
        labels=labels,
        base_model=meta.base_model,
        max_length=meta.max_length,
        weights="int8",
        peft_method=meta.peft_method,
        extra={"quantization": cfg.compress.method},
        cleaning=dict(meta.cleaning),  # the text must be cleaned as it was for training
    )
    save_int8_artifact(qmodel, tokenizer, int8_meta, int8_dir)
    metrics["size_mb_compressed"] = folder_size_mb(int8_dir, INT8_WEIGHTS)
    metrics["size_ratio"] = metrics["size_mb_fp32"] / metrics["size_mb_compressed"]
    for split, short in (("validation", "val"), ("test", "test")):
        for tag, res in (("fp32", before[split]), ("compressed", after[split])):
            if res is None:
                continue
            metrics[f"{short}_accuracy_{tag}"] = res["accuracy"]
            metrics[f"{short}_macro_f1_{tag}"] = res["macro_f1"]
            metrics[f"{short}_loss_{tag}"] = res["loss"]
            metrics[f"{short}_samples_per_s_{tag}"] = res["samples_per_s"]
    if "val_accuracy_fp32" in metrics:
        metrics["val_accuracy_drop"] = (
            metrics["val_accuracy_fp32"] - metrics["val_accuracy_compressed"]
        )
    drop_points = 100.0 * metrics.get("val_accuracy_drop", 0.0)
    accepted = drop_points <= cfg.compress.max_drop + 1e-9
    reason = (
        f"validation accuracy drop {drop_points:.2f} points <= max_drop {cfg.compress.max_drop:g}"
        if accepted
        else f"validation accuracy dropped {drop_points:.2f} points, more than "
        f"compress.max_drop {cfg.compress.max_drop:g}"
    )
    metrics["accepted"] = float(accepted)
    log_metrics(uri, run_id, metrics, step=0)
    for split in ("validation", "test"):
        if after[split] is not None:
            fig = plots.confusion_matrix(after[split]["confusion"], labels, f"{split} (int8)")
            log_figure(uri, run_id, fig, f"plots/confusion_matrix_{split}_int8.png")
    if accepted:
        log_folder(uri, run_id, int8_dir, "model")
    log(
        "[compress] int8: "
        f"{metrics['size_mb_fp32']:.1f} MB -> {metrics['size_mb_compressed']:.1f} MB; "
        + (
            f"val accuracy {metrics['val_accuracy_fp32']:.4f} -> "
            f"{metrics['val_accuracy_compressed']:.4f}"
            if "val_accuracy_fp32" in metrics
            else "no validation split"
        )
    )
    if not accepted:
        log(f"[compress] refused: {reason}; the uncompressed model is kept")
    return CompressResult(
        cfg.compress.method, int8_dir if accepted else None, accepted, reason, metrics
    )
