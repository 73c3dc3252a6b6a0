"""Serving-aware selection (``tune.objective: served``): the sweep's best trials, judged as
they will be served.

After the trials end, the ``tune.served_top_k`` best by ``tune.metric`` (as trained, in
float) each go through the compress stage's own code (``compress_and_measure``: adapters
merged, the method ``compress.method``/``compress.target`` picks on this hardware, the
artifact written and loaded back as a Serve replica loads it, and the accuracy gate). The
model a replica would then serve - the compressed one, or the float one where compression
is off or its gate refused it - is scored on the validation split (``tune.metric``) and
timed: the median of one-row forward passes (``p50_ms``) and of passes at the serving batch
size (``p50_ms_batch``).

The winner is the best served ``tune.metric`` among the trials that meet
``tune.constraints``. With ``tune.latency_objective`` the served trials are an Optuna
multi-objective study (the metric, and ``p50_ms`` minimised): its Pareto front is listed
and plotted, and the winner is the front's best metric within the constraints. No trial
within the constraints: the sweep fails and registers nothing (it never falls back to one
that breaks them).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.visualization import matplotlib as ovm

from lepton_ray.compress.formats import load_model_artifact
from lepton_ray.compress.measure import evaluate as evaluate_model
from lepton_ray.compress.measure import evaluation_set, pad_id, speed
from lepton_ray.compress.quantize import compress_and_measure
from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import StageError
from lepton_ray.registry.versions import run_artifact
from lepton_ray.tasks import get_task
from lepton_ray.tracking.mlflow import client, log_dict, log_figure, log_metrics, set_tags

TAG_FLOAT_BEST = "lepton.float_best_trial_id"
TAG_SERVED_BEST = "lepton.served_best_trial_id"
TAG_RANKINGS_AGREE = "lepton.rankings_agree"
PARETO_PLOT = "plots/served_pareto.png"


def serving_batch(cfg: ExperimentConfig) -> int:
    return cfg.tune.served_batch_size or cfg.serve.max_batch_size


def float_ranking(cfg: ExperimentConfig, usable: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials best first by ``tune.metric`` as trained (ties keep the sweep's order)."""
    t = cfg.tune
    sign = -1.0 if t.mode == "max" else 1.0
    return sorted(usable, key=lambda tr: sign * tr["metrics"][t.metric])


def score_served(cfg: ExperimentConfig, trial: dict[str, Any], log=print) -> dict[str, Any]:
    """Compress, score and time one trial's model as a replica would serve it."""
    metric, batch = cfg.tune.metric, serving_batch(cfg)
    prefix = f"[tune] served {trial['trial_id']}:"

    def quiet(line: str) -> None:
        log(f"{prefix} {line.removeprefix('[compress] ')}")

    with tempfile.TemporaryDirectory(prefix="lepton-served-") as tmp:
        folder = run_artifact(cfg.tracking.tracking_uri, trial["run_id"], "model", Path(tmp))
        result = compress_and_measure(
            cfg, folder, Path(tmp) / "out", quiet, splits=("validation",), serving_batch=batch
        )
        if result.method == "none":
            # Nothing compresses here: the replica serves the merged float model.
            model, tokenizer, meta = load_model_artifact(folder, merge=True)
            task = get_task(meta.task)
            data = evaluation_set(cfg, task, "validation", tokenizer, meta)
            if data is None:
                raise StageError("tune.objective served needs a validation split to score on")
            evaluated = evaluate_model(task, model.float(), data, meta.labels)
            figures = speed(task, model, data, pad_id(tokenizer), evaluated, batch)
            metrics = {f"val_{k}_fp32": v for k, v in evaluated["scores"].items()}
            metrics.update({f"{k}_fp32": v for k, v in figures.items()})
        else:
            metrics = result.metrics
    tag = "compressed" if result.accepted else "fp32"
    served_key = f"{metric}_{tag}"
    if served_key not in metrics:
        measured = sorted(k.removesuffix(f"_{tag}") for k in metrics if k.startswith("val_"))
        raise StageError(
            f"tune.objective served: a served model is scored on {', '.join(measured)}; "
            f"tune.metric {metric} is not among them"
        )
    return {
        "trial_id": trial["trial_id"],
        "run_id": trial["run_id"],
        "params": trial["params"],
        "float": trial["metrics"][metric],
        "served": float(metrics[served_key]),
        "format": result.method if result.accepted else "float32",
        "compression": result.reason,
        "p50_ms": float(metrics[f"latency_ms_batch1_{tag}"]),
        "p50_ms_batch": float(metrics.get(f"p50_ms_batch{batch}_{tag}", math.nan)),
    }


def meets(cfg: ExperimentConfig, row: dict[str, Any]) -> list[str]:
    """The constraints ``row`` breaks, as short phrases (empty: it meets them all)."""
    broken = []
    for name, limit in cfg.tune.constraints.active().items():
        value = row[name]
        if not (value <= limit):  # nan breaks it too
            broken.append(f"{name} {value:.2f} > {limit:g}")
    return broken


def pareto_front(cfg: ExperimentConfig, rows: list[dict[str, Any]]):
    """Optuna's multi-objective study of the served trials (``tune.metric`` in its mode,
    ``p50_ms`` minimised): the study, and the trial ids on its Pareto front."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if cfg.tune.mode == "max" else "minimize", "minimize"]
    study = optuna.create_study(directions=directions)
    ids = [row["trial_id"] for row in rows]
    for row in rows:
        if math.isfinite(row["served"]) and math.isfinite(row["p50_ms"]):
            study.add_trial(
                optuna.trial.create_trial(
                    values=[row["served"], row["p50_ms"]],
                    params={"trial": row["trial_id"]},
                    distributions={"trial": CategoricalDistribution(ids)},
                )
            )
    return study, {t.params["trial"] for t in study.best_trials}


def choose(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """The winner among the served ``rows`` and the Pareto front (empty unless
    ``tune.latency_objective``). A ``StageError`` when no row meets ``tune.constraints``."""
    t = cfg.tune
    front: set[str] = set()
    pool = [row for row in rows if not meets(cfg, row) and math.isfinite(row["served"])]
    if t.latency_objective:
        _, front = pareto_front(cfg, rows)
        pool = [row for row in pool if row["trial_id"] in front]
    if not pool:
        limits = ", ".join(f"{k} <= {v:g}" for k, v in t.constraints.active().items())
        fastest = min(rows, key=lambda row: row["p50_ms"] if math.isfinite(row["p50_ms"]) else 1e30)
        raise StageError(
            f"tune.constraints ({limits}): none of the {len(rows)} served trials meets them "
            f"(fastest: trial {fastest['trial_id']}, p50_ms {fastest['p50_ms']:.2f}, "
            f"p50_ms_batch {fastest['p50_ms_batch']:.2f}); nothing is registered"
        )
    sign = -1.0 if t.mode == "max" else 1.0
    winner = min(pool, key=lambda row: (sign * row["served"], row["p50_ms"]))
    return winner, front


def summary_lines(
    cfg: ExperimentConfig,
    rows: list[dict[str, Any]],
    winner: dict[str, Any] | None,
    front: set[str],
) -> list[str]:
    """Both rankings side by side: by the float metric (the order of ``rows``) and by the
    served metric; the winner named (None: there is none), and whether the two rankings
    disagree."""
    t, batch = cfg.tune, serving_batch(cfg)
    sign = -1.0 if t.mode == "max" else 1.0
    by_served = sorted(rows, key=lambda row: (sign * row["served"], row["p50_ms"]))
    served_rank = {row["trial_id"]: i + 1 for i, row in enumerate(by_served)}
    head = (
        f"{'trial':<14}{'float rank':>11}{'served rank':>12}{'float ' + t.metric:>24}"
        f"{'served':>10}{'p50 ms':>9}{f'p50 ms @{batch}':>14}  {'format':<13} note"
    )
    lines = [head]
    for i, row in enumerate(rows):
        notes = meets(cfg, row)
        if row["trial_id"] in front:
            notes.append("Pareto front")
        if row is winner:
            notes.insert(0, "WINNER")
        lines.append(
            f"{row['trial_id']:<14}{i + 1:>11}{served_rank[row['trial_id']]:>12}"
            f"{row['float']:>24.4f}{row['served']:>10.4f}{row['p50_ms']:>9.2f}"
            f"{row['p50_ms_batch']:>14.2f}  {row['format']:<13} {'; '.join(notes)}"
        )
    if winner is None:
        return lines
    agree = rows[0]["trial_id"] == winner["trial_id"]
    lines.append(
        f"winner: trial {winner['trial_id']} ({t.metric} {winner['served']:.4f} served as "
        f"{winner['format']}, p50 {winner['p50_ms']:.2f} ms at batch 1, "
        f"{winner['p50_ms_batch']:.2f} ms at batch {batch}); "
        + (
            "the float and served rankings agree on it"
            if agree
            else f"the rankings DISAGREE: by the float metric trial {rows[0]['trial_id']} "
            "would have won"
        )
    )
    return lines


def select_served(
    cfg: ExperimentConfig,
    usable: list[dict[str, Any]],
    parent_run_id: str,
    log=print,
) -> dict[str, Any]:
    """Score the top ``tune.served_top_k`` trials as served, log both rankings (and the
    Pareto front) to the sweep's run, and return the winning trial."""
    t, uri = cfg.tune, cfg.tracking.tracking_uri
    c = client(uri)
    ranked = []
    for trial in float_ranking(cfg, usable):
        if len(ranked) == t.served_top_k:
            break
        if "model" in {a.path for a in c.list_artifacts(trial["run_id"])}:
            ranked.append(trial)
        else:  # a trial that failed before its first evaluation saved no model
            log(f"[tune] served: trial {trial['trial_id']} left no model to serve; skipped")
    if not ranked:
        raise StageError("tune.objective served: no trial left a model to serve")
    log(
        f"[tune] objective served: scoring the {len(ranked)} best trials by {t.metric} as "
        f"served (merged, compressed, timed at batch 1 and {serving_batch(cfg)})"
    )
    rows = [score_served(cfg, trial, log) for trial in ranked]
    for row in rows:
        served = {
            f"served_{t.metric}": row["served"],
            "served_p50_ms": row["p50_ms"],
            "served_p50_ms_batch": row["p50_ms_batch"],
        }
        log_metrics(uri, row["run_id"], {k: v for k, v in served.items() if math.isfinite(v)}, 0)
    try:
        winner, front = choose(cfg, rows)
    except StageError:
        for line in summary_lines(cfg, rows, None, set()):
            log(f"[tune] {line}")  # what each served trial measured, before the refusal
        raise
    lines = summary_lines(cfg, rows, winner, front)
    for line in lines:
        log(f"[tune] {line}")
    agree = rows[0]["trial_id"] == winner["trial_id"]
    set_tags(
        uri,
        parent_run_id,
        {
            TAG_FLOAT_BEST: rows[0]["trial_id"],
            TAG_SERVED_BEST: winner["trial_id"],
            TAG_RANKINGS_AGREE: str(agree).lower(),
        },
    )
    log_dict(
        uri,
        parent_run_id,
        {"winner": winner["trial_id"], "agree": agree, "front": sorted(front), "trials": rows},
        "tune/served.json",
    )
    c.log_text(parent_run_id, "\n".join(lines) + "\n", "tune/served_summary.txt")
    if t.latency_objective:
        figure = _pareto_figure(cfg, rows, log)
        if figure is not None:
            log_figure(uri, parent_run_id, figure, PARETO_PLOT)
    return next(tr for tr in usable if tr["trial_id"] == winner["trial_id"])


def _pareto_figure(cfg: ExperimentConfig, rows: list[dict[str, Any]], log):
    study, _ = pareto_front(cfg, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            axes = ovm.plot_pareto_front(
                study, target_names=[f"served {cfg.tune.metric}", "p50 ms (batch 1)"]
            )
        except (ValueError, RuntimeError) as err:
            log(f"[tune] {PARETO_PLOT} skipped: {err}")
            return None
    figure = axes.figure
    figure.set_size_inches(7, 5)
    figure.tight_layout()
    return figure
