"""``run_compress``: merge adapters into the base, compress, measure what it cost, gate it.

The method comes from ``compress.method``/``compress.target`` and the hardware
(``lepton_ray.compress.select``); a method that cannot serve the model (``onnx_int8`` for a
model that generates text) is refused before anything is made. The compressed artifact is
written, loaded back the way a Serve replica loads it, and that loaded model is what is
measured: on validation (and test) every score ``evaluate`` gives (so every ``val_*`` that
``tune.metric`` may name, under the names the promotion gate reads), size, and speed
(``lepton_ray.compress.measure``: batch 32 and batch 1 forward passes; for a model that
generates, greedy tokens per second at batch 1 and 8), against the float model. A
compression whose validation gate score (the task's ``gate_score``: a classifier's
accuracy, a language model's perplexity), or ``tune.metric``, is worse than allowed is
refused: no folder, and the caller keeps the uncompressed model. A perplexity may rise by
``compress.max_ppl_increase`` (relative); any other score may lose ``compress.max_drop``
points.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton_ray.artifacts import ModelMeta, folder_size_mb, save_float_artifact, unmerged_refusal
from lepton_ray.compress.formats import (
    load_model_artifact,
    quantize_dynamic_int8,
    save_int8_artifact,
)
from lepton_ray.compress.measure import (
    GENERATION_BATCHES,
    SPEED_BATCH,
    calibration_batches,
    evaluation_set,
    pad_id,
    speed,
    training_batches,
)
from lepton_ray.compress.measure import evaluate as _evaluate
from lepton_ray.config import ExperimentConfig, metric_mode
from lepton_ray.errors import ConfigError
from lepton_ray.tasks import get_task

SPLIT_PREFIX = {"validation": "val", "test": "test"}
"""Metric name prefix of each measured split."""

WEIGHT_KINDS = {
    "dynamic_int8": "int8",
    "onnx_int8": "onnx_int8",
    "bf16": "bf16",
    "int8_weight_only": "gpu_weight_only",
    "int4_weight_only": "gpu_weight_only",
    "fp32": "full",  # a pruned float model (compress.prune), as it is
}


def lower_is_better(score: str) -> bool:
    """A score whose worsening is a rise (a loss), logged as ``*_<score>_rise``."""
    return metric_mode(score) == "min"


@dataclass
class CompressResult:
    method: str  # the format made: dynamic_int8, onnx_int8, bf16, ...; "none" if disabled
    folder: Path | None  # the compressed artifact; None when refused or disabled
    accepted: bool  # False when the gate (judge) refused it (then folder is None)
    reason: str  # one line for the log: why this method / why refused
    metrics: dict[str, float]  # already logged to MLflow by run_compress
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``compress_and_measure``: each model's (fp32, compressed) raw results per split."""
    pruning: dict[str, Any] = field(default_factory=dict)
    """What ``compress.prune`` did (empty: no pruning); also in the artifact's meta."""


def _cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _calibration_batches(cfg: ExperimentConfig, tokenizer) -> list[dict[str, Any]]:
    """``compress.calibration_rows`` seeded rows of the training split (``measure``)."""
    return calibration_batches(cfg, get_task(cfg.task), tokenizer)


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
    pruning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the ``method`` artifact of the float ``model`` into ``folder``.

    Returns what the recipe did (recorded in the artifact's ``extra["compression"]``).
    ``validation`` batches check an ONNX export against torch; they choose nothing. A method
    that cannot serve the model (``refusal``) is a ``ConfigError``.
    """
    import torch

    why_not = refusal(method, model)
    if why_not:
        raise ConfigError(why_not)
    comp = cfg.compress
    details: dict[str, Any] = {"pruning": pruning} if pruning else {}
    if method in ("dynamic_int8", "onnx_int8"):
        keep = list(get_task(meta.task).keep_float if comp.keep_float is None else comp.keep_float)
        if comp.sensitive_layers:
            from lepton_ray.compress.sensitivity import rank_linears

            if not calibration:
                log("[compress] no training split to rank layers on: sensitive_layers ignored")
            else:
                ranked = rank_linears(
                    model,
                    calibration,
                    keep,
                    per_channel=comp.per_channel,
                    embeddings=comp.quantize_embeddings,
                    inputs=get_task(meta.task).model_inputs,
                )
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
    elif method == "fp32":
        save_float_artifact(model, tokenizer, compressed_meta(meta, method, details), folder)
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


def refusal(method: str, model) -> str | None:
    """Why ``method`` cannot make a working artifact of ``model`` (None: it can)."""
    from lepton_ray.compress.measure import can_generate

    if method == "onnx_int8" and can_generate(model):
        return (
            "compress.method onnx_int8 exports one forward pass to logits, and this model "
            "generates text (a decoding loop with a KV cache, which the ONNX graph and its "
            "loader do not have); use dynamic_int8 or bf16 on a CPU (or compress.method: "
            "auto), int8_weight_only/int4_weight_only on a GPU"
        )
    return None


def compress_and_measure(
    cfg: ExperimentConfig,
    model_dir: Path,
    out: Path,
    log=print,
    splits: Sequence[str] = ("validation", "test"),
    serving_batch: int | None = None,
) -> CompressResult:
    """Merge, compress and measure the artifact in ``model_dir`` (into ``out``), and judge
    it; nothing is logged to MLflow. The folder is left in place even when refused (the
    caller removes it); ``evaluations`` keeps each model's raw results per split.
    ``serving_batch``: also time forward passes of that many rows (``p50_ms_batch<n>_*``)."""
    from lepton_ray.compress.modules import ort_available
    from lepton_ray.compress.select import choose_method
    from lepton_ray.hardware import cpu_features

    comp = cfg.compress
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

    why_not = unmerged_refusal(ModelMeta.load(model_dir), "compress")
    if why_not:
        raise ConfigError(why_not)
    model, tokenizer, meta = load_model_artifact(model_dir, merge=True)
    model = model.float()
    why_not = refusal(method, model)
    if why_not:
        raise ConfigError(why_not)
    log(f"[compress] {method}: {choice.reason}")
    labels = meta.labels
    fp32_dir = out / "uncompressed"  # not "fp32": that is compress.method fp32's folder
    model.save_pretrained(fp32_dir, safe_serialization=True)
    metrics: dict[str, float] = {"size_mb_fp32": folder_size_mb(fp32_dir, "*.safetensors")}
    if meta.peft_method != "none":
        log(
            f"[compress] merged the {meta.peft_method} adapter into the base: "
            f"{metrics['size_mb_fp32']:.1f} MB fp32"
        )

    pad = pad_id(tokenizer)
    task = get_task(meta.task)
    sets = {s: evaluation_set(cfg, task, s, tokenizer, meta) for s in splits}

    def measure(m) -> dict[str, dict | None]:
        return {s: None if b is None else _evaluate(task, m, b, labels) for s, b in sets.items()}

    before = measure(model)
    source, pruning = model, {}
    if comp.prune is not None:
        from lepton_ray.compress.prune import prune_model

        validation, size = sets.get("validation"), cfg.train.batch_size
        pruned = prune_model(
            cfg,
            model,
            task,
            lambda m: None if validation is None else _evaluate(task, m, validation, labels),
            lambda rows: training_batches(cfg, task, tokenizer, rows, size),
            log,
            before.get("validation"),
        )
        source, pruning = pruned.model, pruned.details
        metrics.update(pruned.metrics)
    folder = out / method
    build_compressed(
        method,
        source,
        tokenizer,
        meta,
        cfg,
        folder,
        _calibration_batches(cfg, tokenizer),
        [] if sets.get("validation") is None else sets["validation"],
        log,
        pruning,
    )
    # Measure what was written, loaded as a Serve replica loads it.
    cmodel, _, _ = load_model_artifact(folder)
    after = measure(cmodel)
    metrics["size_mb_compressed"] = _weights_mb(folder)
    metrics["size_ratio"] = metrics["size_mb_fp32"] / max(metrics["size_mb_compressed"], 1e-9)
    for split in splits:
        short = SPLIT_PREFIX[split]
        for tag, res in (("fp32", before[split]), ("compressed", after[split])):
            if res is None:
                continue
            for score, value in res["scores"].items():
                metrics[f"{short}_{score}_{tag}"] = value
            if "samples_per_s" in res:
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
    timed = next((s for s in splits if sets[s] is not None), None)
    if timed is not None:
        for tag, m, res in (("fp32", model, before), ("compressed", cmodel, after)):
            figures = speed(task, m, sets[timed], pad, res[timed], serving_batch)
            metrics.update({f"{name}_{tag}": value for name, value in figures.items()})
        key = "samples_per_s" if "samples_per_s_fp32" in metrics else _generation_speed_key()
        if f"{key}_fp32" in metrics:
            metrics["speedup"] = metrics[f"{key}_compressed"] / metrics[f"{key}_fp32"]

    accepted, reason = judge(
        metrics, method, cfg.tune.metric, comp.max_drop, task.gate_score, comp.max_ppl_increase
    )
    metrics["accepted"] = float(accepted)
    return CompressResult(
        method, folder, accepted, reason, metrics, {"fp32": before, "compressed": after}, pruning
    )


def run_compress(
    cfg: ExperimentConfig, model_dir: Path, out: Path, run_id: str, log=print
) -> CompressResult:
    """Compress the artifact in ``model_dir`` into ``out``; log before/after metrics to ``run_id``.

    A compression that scores worse on validation than ``judge`` allows is refused
    (``accepted`` False, its folder removed): the uncompressed model is kept. A method that
    cannot serve the model is a ``ConfigError`` before anything is written.
    """
    from lepton_ray.tracking.mlflow import log_figure, log_folder, log_metrics

    result = compress_and_measure(cfg, model_dir, out, log)
    if result.folder is None:
        return result  # compression off, or no method for this hardware
    uri, method, metrics = cfg.tracking.tracking_uri, result.method, result.metrics
    log_metrics(uri, run_id, metrics, step=0)
    if result.pruning:
        from lepton_ray.compress.prune import log_prune_params

        log_prune_params(uri, run_id, result.pruning)
    meta = ModelMeta.load(model_dir)
    labels, task = meta.labels, get_task(meta.task)
    for split, evaluated in result.evaluations["compressed"].items():
        if evaluated is not None:
            inputs = task.plot_inputs(evaluated["result"])
            for name, fig in task.plots(inputs, labels, f"{split} ({method})").items():
                log_figure(uri, run_id, fig, f"plots/{name}_{split}_{method}.png")
    if result.accepted:
        log_folder(uri, run_id, result.folder, "model")
    else:
        shutil.rmtree(result.folder, ignore_errors=True)  # a refused artifact is never left
        result.folder = None
    log(_summary(method, metrics, task.gate_score))
    scores = _scores_line(metrics)
    if scores:
        log(scores)
    if not result.accepted:
        log(f"[compress] refused: {result.reason}; the uncompressed model is kept")
    return result


def _generation_speed_key() -> str:
    return f"tokens_per_s_batch{max(GENERATION_BATCHES)}"


def relative_score(score: str) -> bool:
    """A score judged by its relative rise (``compress.max_ppl_increase``): a perplexity,
    which grows exponentially with the loss, so points of it mean nothing."""
    return "perplexity" in score


def _worsening_key(short: str, score: str) -> str:
    if relative_score(score):
        return f"{short}_{score}_increase"
    return f"{short}_{score}_{'rise' if lower_is_better(score) else 'drop'}"


def _worsening(score: str, before: float, after: float) -> float:
    """How much worse the compressed model scores: a drop, for a loss a rise, for a
    perplexity its relative rise (0.05: 5% higher)."""
    if relative_score(score):
        return (after - before) / before if before > 0 else float("nan")
    return after - before if lower_is_better(score) else before - after


def judge(
    metrics: dict[str, float],
    method: str,
    gate_metric: str,
    max_drop: float,
    always: str,
    max_ppl_increase: float = 0.05,
) -> tuple[bool, str]:
    """The compression gate on the validation scores in ``metrics``: ``always`` (the task's
    ``gate_score``) and ``gate_metric`` (``tune.metric``, when it is a validation score) may
    each be at most so much worse: a perplexity ``max_ppl_increase`` higher (relative, 0.05
    = 5%), any other score ``max_drop`` points (0.01 of the score each; for a loss, a rise).
    A score that is nan after compression (a diverged model, or one class only) fails.
    Returns (accepted, why)."""
    if _worsening_key("val", always) not in metrics:
        return True, f"{method}: no validation split to check the {always} on; accepted unchecked"
    judged = [always]
    score = gate_metric.removeprefix("val_")
    if _worsening_key("val", score) in metrics and score != always:
        judged.append(score)
    checks = []
    for name in judged:
        key = _worsening_key("val", name)
        label = key.removeprefix("val_").replace("_", " ")
        value = metrics[key]
        if relative_score(name):
            limit = f"compress.max_ppl_increase {max_ppl_increase:g}"
            text = f"{label} {100.0 * value:.2f}%"
            ok = not math.isnan(value) and value <= max_ppl_increase + 1e-12
        else:
            limit = f"compress.max_drop {max_drop:g}"
            text = f"{label} {100.0 * value:.2f} points"
            ok = 100.0 * value <= max_drop + 1e-9
        checks.append((ok, text, limit))
    measured = ", ".join(text for _, text, _ in checks)
    if len(judged) == 1 and gate_metric != f"val_{always}":
        measured += f" (tune.metric {gate_metric} is not measured on validation rows)"
    if all(ok for ok, _, _ in checks):
        limits = " and ".join(dict.fromkeys(limit for _, _, limit in checks))
        return True, f"{method}: validation {measured}, within {limits}"
    worse = " and ".join(text for ok, text, _ in checks if not ok)
    limits = " and ".join(dict.fromkeys(limit for ok, _, limit in checks if not ok))
    return False, f"{method}: validation {worse}: more than {limits} (measured: {measured})"


def _summary(method: str, m: dict[str, float], score: str) -> str:
    parts = [f"{m['size_mb_fp32']:.1f} MB -> {m['size_mb_compressed']:.1f} MB"]
    if "samples_per_s_fp32" in m:
        parts.append(
            f"{m['samples_per_s_fp32']:.0f} -> {m['samples_per_s_compressed']:.0f} samples/s "
            f"at batch {SPEED_BATCH} ({m['speedup']:.2f}x)"
        )
    for batch in GENERATION_BATCHES:
        key = f"tokens_per_s_batch{batch}"
        if f"{key}_fp32" in m:
            parts.append(
                f"{m[f'{key}_fp32']:.1f} -> {m[f'{key}_compressed']:.1f} tokens/s at batch {batch}"
            )
    if f"val_{score}_fp32" in m:
        parts.append(
            f"val {score.replace('_', ' ')} {m[f'val_{score}_fp32']:.4f} -> "
            f"{m[f'val_{score}_compressed']:.4f}"
        )
    else:
        parts.append("no validation split")
    return f"[compress] {method}: " + "; ".join(parts)


def _scores_line(m: dict[str, float]) -> str:
    """Every validation score before -> after (a language model's generation scores among
    them); nan scores (not measured) are left out."""
    names = [k[4:-5] for k in m if k.startswith("val_") and k.endswith("_fp32")]
    shown = [
        f"{n.replace('_', ' ')} {m[f'val_{n}_fp32']:.4f} -> {m[f'val_{n}_compressed']:.4f}"
        for n in names
        if f"val_{n}_compressed" in m
        and "samples_per_s" not in n
        and not (math.isnan(m[f"val_{n}_fp32"]) and math.isnan(m[f"val_{n}_compressed"]))
    ]
    return "[compress] validation " + ", ".join(shown) if shown else ""
