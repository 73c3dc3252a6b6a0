"""``run_compress``: merge adapters into the base, compress, measure what it cost, gate it.

The method comes from ``compress.method``/``compress.target`` and the hardware
(``lepton_ray.compress.select``). The compressed artifact is written, loaded back the way a
Serve replica loads it, and that loaded model is what is measured: on validation (and test)
every score ``evaluate`` gives (so every ``val_*`` that ``tune.metric`` may name, under the
names the promotion gate reads), size, and speed at batch 32 and batch 1, against the float
model. A compression whose validation accuracy, or ``tune.metric``, is more than
``compress.max_drop`` points worse is refused: no folder, and the caller keeps the
uncompressed model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton_ray.artifacts import ModelMeta, folder_size_mb, save_float_artifact
from lepton_ray.compress.formats import (
    load_model_artifact,
    quantize_dynamic_int8,
    save_int8_artifact,
)
from lepton_ray.config import ExperimentConfig, metric_mode
from lepton_ray.data.split_files import open_split
from lepton_ray.tasks import Task, get_task

SPEED_BATCH = 32
"""Batch size of the evaluation passes whose throughput is logged (``samples_per_s_*``)."""
LATENCY_ROWS = 32
"""Single-row forward passes timed for ``latency_ms_batch1_*``."""
WEIGHT_KINDS = {
    "dynamic_int8": "int8",
    "onnx_int8": "onnx_int8",
    "bf16": "bf16",
    "int8_weight_only": "gpu_weight_only",
    "int4_weight_only": "gpu_weight_only",
}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id or 0


class _SplitBatches:
    """A split's token batches, streamed from its files again each time they are iterated:
    the float and the compressed model are both scored on it, and it is never held whole."""

    def __init__(self, task: Task, rows, pad_id: int):
        self.task, self.rows, self.pad_id = task, rows, pad_id

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for frame in self.rows:
            yield from self.task.frame_batches(frame, SPEED_BATCH, self.pad_id)


def _evaluate(task: Task, model, batches: Iterable[dict[str, Any]], labels) -> dict[str, Any]:
    """The task's scores (``gate_scores``, every score a gate may compare) and throughput;
    ``result`` keeps the raw evaluation (agreement, plots)."""
    started = time.perf_counter()
    result = task.evaluate(model, batches, labels)
    seconds = time.perf_counter() - started
    scores = task.gate_scores(result)
    return {"scores": scores, "samples_per_s": result["examples"] / seconds, "result": result}


def lower_is_better(score: str) -> bool:
    """A score whose worsening is a rise (a loss), logged as ``*_<score>_rise``."""
    return metric_mode(score) == "min"


def _latency_ms(model, batches: Iterable[dict[str, Any]]) -> float:
    """Median milliseconds of a one-row forward pass over up to LATENCY_ROWS rows."""
    import torch

    rows = []
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            length = int(batch["attention_mask"][i].sum())
            rows.append({k: v[i : i + 1, :length] for k, v in batch.items() if k != "labels"})
            if len(rows) >= LATENCY_ROWS:
                break
        if len(rows) >= LATENCY_ROWS:
            break
    if not rows:
        return float("nan")
    times = []
    with torch.inference_mode():
        model(**rows[0])  # warm-up
        for row in rows:
            started = time.perf_counter()
            model(**row)
            times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)


@dataclass
class CompressResult:
    method: str  # the format made: dynamic_int8, onnx_int8, bf16, ...; "none" if disabled
    folder: Path | None  # the compressed artifact; None when refused or disabled
    accepted: bool  # False when the accuracy gate refused it (then folder is None)
    reason: str  # one line for the log: why this method / why refused
    metrics: dict[str, float]  # already logged to MLflow by run_compress


def _cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _calibration_batches(cfg: ExperimentConfig, tokenizer) -> list[dict[str, Any]]:
    """``compress.calibration_rows`` seeded rows of the training split (never validation:
    that split judges the result), read by row group: the split is never held whole."""
    task = get_task(cfg.task)
    train = open_split(cfg, "train", ["input_ids", task.target_column])
    frame = None if train is None else train.sample(cfg.compress.calibration_rows, cfg.train.seed)
    if frame is None:
        return []
    return list(task.frame_batches(frame, SPEED_BATCH, _pad_id(tokenizer)))


def compressed_meta(meta: ModelMeta, method: str, details: dict[str, Any]) -> ModelMeta:
    return ModelMeta(
        task=meta.task,
        labels=list(meta.labels),
        base_model=meta.base_model,
        max_length=meta.max_length,
        weights=WEIGHT_KINDS[method],
        peft_method=meta.peft_method,
        config_overrides=dict(meta.config_overrides),
        extra={**meta.extra, "quantization": method, "compression": details},
        cleaning=dict(meta.cleaning),  # the text must be cleaned as it was for training
    )


def build_compressed(
    method: str,
    model,
    tokenizer,
    meta: ModelMeta,
    cfg: ExperimentConfig,
    folder: Path,
    calibration: Sequence[dict[str, Any]],
    validation: Iterable[dict[str, Any]],
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Write the ``method`` artifact of the float ``model`` into ``folder``.

    Returns what the recipe did (recorded in the artifact's ``extra["compression"]``).
    ``validation`` batches check an ONNX export against torch; they choose nothing.
    """
    import torch

    comp = cfg.compress
    details: dict[str, Any] = {}
    if method in ("dynamic_int8", "onnx_int8"):
        keep = list(get_task(meta.task).keep_float if comp.keep_float is None else comp.keep_float)
        if comp.sensitive_layers:
            from lepton_ray.compress.sensitivity import rank_linears

            if not calibration:
                log("[compress] no training split to rank layers on: sensitive_layers ignored")
            else:
                ranked = rank_linears(model, calibration, keep, per_channel=comp.per_channel)
                chosen = [name for name, _ in ranked[: comp.sensitive_layers]]
                log(
                    f"[compress] kept in float32 (most sensitive on {sum(len(b['input_ids']) for b in calibration)} "
                    f"training rows): {', '.join(chosen)}"
                )
                keep += chosen
        details.update(
            per_channel=comp.per_channel,
            keep_float=keep,
            quantize_embeddings=comp.quantize_embeddings,
        )
    if method == "dynamic_int8":
        qmodel = quantize_dynamic_int8(
            model,
            per_channel=comp.per_channel,
            keep_float=keep,
            embeddings=comp.quantize_embeddings,
        )
        save_int8_artifact(qmodel, tokenizer, compressed_meta(meta, method, details), folder)
    elif method == "onnx_int8":
        from lepton_ray.compress.formats import ONNX_FILE
        from lepton_ray.compress.onnx_int8 import check_export, export_onnx, quantize_onnx_int8

        fp32_onnx = folder.parent / f"{folder.name}-fp32" / ONNX_FILE
        probe = validation if next(iter(validation), None) is not None else calibration
        export_onnx(model, next(iter(probe)), fp32_onnx)
        check = check_export(model, fp32_onnx, probe)
        log(
            f"[compress] ONNX export checked on {'validation' if probe is validation else 'training'} "
            f"rows: logits within {check['max_abs_logit_diff']:.1e} of torch, "
            f"{100 * check['prediction_agreement']:.2f}% same predictions"
        )
        details["export_max_abs_logit_diff"] = check["max_abs_logit_diff"]
        folder.mkdir(parents=True, exist_ok=True)
        quantize_onnx_int8(
            fp32_onnx,
            folder / ONNX_FILE,
            per_channel=comp.per_channel,
            keep_float=keep,
            embeddings=comp.quantize_embeddings,
        )
        tokenizer.save_pretrained(folder)
        compressed_meta(meta, method, details).save(folder)
    elif method in ("bf16", "int8_weight_only", "int4_weight_only"):
        # bf16 is the format; the GPU methods quantize these bf16 weights when loaded there.
        import copy

        save_float_artifact(
            copy.deepcopy(model).to(torch.bfloat16),
            tokenizer,
            compressed_meta(meta, method, details),
            folder,
        )
    else:
        raise ValueError(f"unknown compression method {method!r}")
    return details


def _weights_mb(folder: Path) -> float:
    return folder_size_mb(folder, "*.safetensors") + folder_size_mb(folder, "*.onnx")


def run_compress(
    cfg: ExperimentConfig, model_dir: Path, out: Path, run_id: str, log=print
) -> CompressResult:
    """Compress the artifact in ``model_dir`` into ``out``; log before/after metrics to ``run_id``.

    A compression whose validation accuracy or ``tune.metric`` is more than
    ``compress.max_drop`` points worse (``judge``) is refused (``accepted`` False, no
    folder): the uncompressed model is kept.
    """
    from lepton_ray.compress.modules import ort_available
    from lepton_ray.compress.select import choose_method
    from lepton_ray.hardware import cpu_features
    from lepton_ray.tracking.mlflow import log_figure, log_folder, log_metrics

    comp = cfg.compress
    uri = cfg.tracking.tracking_uri
    if not comp.enabled:
        log("[compress] skipped: compress.enabled is false")
        return CompressResult("none", None, False, "compress.enabled is false", {})
    choice = choose_method(
        comp.method, comp.target, cpu_features(), _cuda_name(), onnxruntime=ort_available()
    )
    if choice.method == "none":
        log(f"[compress] skipped: {choice.reason}")
        return CompressResult("none", None, False, choice.reason, {})
    method = choice.method
    log(f"[compress] {method}: {choice.reason}")

    model, tokenizer, meta = load_model_artifact(model_dir, merge=True)
    model = model.float()
    labels = meta.labels
    fp32_dir = out / "fp32"
    model.save_pretrained(fp32_dir, safe_serialization=True)
    metrics: dict[str, float] = {"size_mb_fp32": folder_size_mb(fp32_dir, "*.safetensors")}
    if meta.peft_method != "none":
        log(
            f"[compress] merged the {meta.peft_method} adapter into the base: "
            f"{metrics['size_mb_fp32']:.1f} MB fp32"
        )

    pad = _pad_id(tokenizer)
    task = get_task(meta.task)
    splits = {}
    for split in ("validation", "test"):
        rows = open_split(cfg, split, ["input_ids", task.target_column])
        splits[split] = None if rows is None else _SplitBatches(task, rows, pad)

    def measure(m) -> dict[str, dict | None]:
        return {s: None if b is None else _evaluate(task, m, b, labels) for s, b in splits.items()}

    before = measure(model)
    folder = out / method
    build_compressed(
        method,
        model,
        tokenizer,
        meta,
        cfg,
        folder,
        _calibration_batches(cfg, tokenizer),
        [] if splits["validation"] is None else splits["validation"],
        log,
    )
    # Measure what was written, loaded as a Serve replica loads it.
    cmodel, _, _ = load_model_artifact(folder)
    after = measure(cmodel)
    metrics["size_mb_compressed"] = _weights_mb(folder)
    metrics["size_ratio"] = metrics["size_mb_fp32"] / max(metrics["size_mb_compressed"], 1e-9)
    for split, short in (("validation", "val"), ("test", "test")):
        for tag, res in (("fp32", before[split]), ("compressed", after[split])):
            if res is None:
                continue
            for score, value in res["scores"].items():
                metrics[f"{short}_{score}_{tag}"] = value
            metrics[f"{short}_samples_per_s_{tag}"] = res["samples_per_s"]
        if before[split] is not None:
            was, now = before[split], after[split]
            for score in was["scores"]:
                metrics[_worsening_key(short, score)] = _worsening(
                    score, was["scores"][score], now["scores"][score]
                )
            agree = task.agreement(was["result"], now["result"])
            if agree is not None:
                metrics[f"{short}_prediction_agreement"] = agree
    timing = splits["validation"] if splits["validation"] is not None else splits["test"]
    if timing is not None:
        short = "val" if splits["validation"] is not None else "test"
        for tag, m in (("fp32", model), ("compressed", cmodel)):
            metrics[f"samples_per_s_{tag}"] = metrics[f"{short}_samples_per_s_{tag}"]
            metrics[f"latency_ms_batch{SPEED_BATCH}_{tag}"] = (
                1000.0 * SPEED_BATCH / metrics[f"samples_per_s_{tag}"]
            )
            metrics[f"latency_ms_batch1_{tag}"] = _latency_ms(m, timing)
        metrics["speedup"] = metrics["samples_per_s_compressed"] / metrics["samples_per_s_fp32"]

    accepted, reason = judge(metrics, method, cfg.tune.metric, comp.max_drop, task.gate_score)
    metrics["accepted"] = float(accepted)
    log_metrics(uri, run_id, metrics, step=0)
    for split in ("validation", "test"):
        if after[split] is not None:
            inputs = task.plot_inputs(after[split]["result"])
            for name, fig in task.plots(inputs, labels, f"{split} ({method})").items():
                log_figure(uri, run_id, fig, f"plots/{name}_{split}_{method}.png")
    if accepted:
        log_folder(uri, run_id, folder, "model")
    log(_summary(method, metrics, task.gate_score))
    if not accepted:
        log(f"[compress] refused: {reason}; the uncompressed model is kept")
    return CompressResult(method, folder if accepted else None, accepted, reason, metrics)


def _worsening_key(short: str, score: str) -> str:
    return f"{short}_{score}_{'rise' if lower_is_better(score) else 'drop'}"


def _worsening(score: str, before: float, after: float) -> float:
    """How much worse the compressed model scores (a drop, or for a loss a rise)."""
    return after - before if lower_is_better(score) else before - after


def judge(
    metrics: dict[str, float], method: str, gate_metric: str, max_drop: float, always: str
) -> tuple[bool, str]:
    """The ``compress.max_drop`` gate on the validation scores in ``metrics``: ``always`` (the
    task's ``gate_score``, a classifier's accuracy) and ``gate_metric`` (``tune.metric``,
    when it is a validation score) may each be at most ``max_drop`` points (0.01 of the
    score each) worse. A score that is nan after compression (a diverged model, or one class
    only) fails. Returns (accepted, why)."""
    if _worsening_key("val", always) not in metrics:
        return True, f"{method}: no validation split to check the {always} on; accepted unchecked"
    judged = [always]
    score = gate_metric.removeprefix("val_")
    if _worsening_key("val", score) in metrics and score != always:
        judged.append(score)
    checks = []
    for name in judged:
        key = _worsening_key("val", name)
        points = 100.0 * metrics[key]
        text = f"{key.removeprefix('val_').replace('_', ' ')} {points:.2f} points"
        checks.append((points <= max_drop + 1e-9, text))
    measured = ", ".join(text for _, text in checks)
    if len(judged) == 1 and gate_metric != f"val_{always}":
        measured += f" (tune.metric {gate_metric} is not measured on validation rows)"
    if all(ok for ok, _ in checks):
        return True, f"{method}: validation {measured}, within compress.max_drop {max_drop:g}"
    worse = " and ".join(text for ok, text in checks if not ok)
    return False, (
        f"{method}: validation {worse}: more than compress.max_drop {max_drop:g} "
        f"(measured: {measured})"
    )


def _summary(method: str, m: dict[str, float], score: str) -> str:
    parts = [f"{m['size_mb_fp32']:.1f} MB -> {m['size_mb_compressed']:.1f} MB"]
    if "samples_per_s_fp32" in m:
        parts.append(
            f"{m['samples_per_s_fp32']:.0f} -> {m['samples_per_s_compressed']:.0f} samples/s "
            f"at batch {SPEED_BATCH} ({m['speedup']:.2f}x)"
        )
    if f"val_{score}_fp32" in m:
        parts.append(
            f"val {score.replace('_', ' ')} {m[f'val_{score}_fp32']:.4f} -> "
            f"{m[f'val_{score}_compressed']:.4f}"
        )
    else:
        parts.append("no validation split")
    return f"[compress] {method}: " + "; ".join(parts)
