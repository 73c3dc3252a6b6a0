"""What a sweep tells its user: who stopped each trial and at which rung, the live trial
table, the summary (MLflow runs settled, plots), and the best config as YAML."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray.tune import Callback

from lepton_ray.config import ExperimentConfig
from lepton_ray.config.space import Dimension

STOPPED_BY_PATIENCE = "early_stopping"
STOP_REASONS = {
    "asha": "ASHA",
    "median": "the median stopping rule",
    "hyperband": "HyperBand",
    STOPPED_BY_PATIENCE: "its own early stopping (train.early_stopping.patience)",
}
TAG_STOPPED_BY = "lepton.stopped_by"
TAG_RUNG = "lepton.rung"
TAG_SEARCHER_VALUES = "lepton.searcher_values"
"""A trial run's Optuna values as JSON (by Optuna's names): what a warm start replays."""


def time_attr(cfg: ExperimentConfig) -> str:
    return cfg.tune.scheduler.time_attr


def max_t(cfg: ExperimentConfig) -> float:
    s = cfg.tune.scheduler
    return float(s.max_t or cfg.train.epochs)


def milestones(cfg: ExperimentConfig) -> list[float]:
    """The times at which ASHA (and HyperBand's brackets) compare trials: the grace period
    times powers of the reduction factor, up to max_t."""
    s = cfg.tune.scheduler
    if s.type not in ("asha", "hyperband"):
        return []
    top = max_t(cfg)
    grace = min(float(s.grace_period), top)
    out, t = [], grace
    while t < top:
        out.append(t)
        t *= s.reduction_factor
    return out


def rung(cfg: ExperimentConfig, reached: float) -> int | None:
    """How many of ASHA's comparisons a trial at time ``reached`` has passed (None when the
    scheduler has no rungs)."""
    marks = milestones(cfg)
    if not marks:
        return None
    return sum(1 for m in marks if reached + 1e-9 >= m)


def stop_reason(
    metrics: dict[str, Any], cfg: ExperimentConfig, error: BaseException | None
) -> str | None:
    """Who ended a trial before its budget: the trial itself (its early stopping saw no
    gain for ``patience`` evaluations, reported as ``stopped_early``) or the scheduler (the
    trial was still going at its last report); None for a trial that ran to the end or
    failed."""
    attr = time_attr(cfg)
    budget = max_t(cfg) if attr == "step" else min(max_t(cfg), cfg.train.epochs)
    reached = round(float(metrics.get(attr, 0)), 3)
    if (
        error is not None
        or reached >= budget
        or round(float(metrics.get("epoch", 0)), 3) >= cfg.train.epochs
    ):
        return None
    if metrics.get("stopped_early"):
        return STOPPED_BY_PATIENCE
    scheduler = cfg.tune.scheduler.type
    return None if scheduler == "none" else scheduler


def stop_line(cfg: ExperimentConfig, stopped_by: str | None, reached: float) -> str:
    if stopped_by is None:
        return ""
    attr = time_attr(cfg)
    where = f"{attr} {reached:g}"
    step = rung(cfg, reached)
    if stopped_by in ("asha", "hyperband") and step is not None:
        s = cfg.tune.scheduler
        return (
            f"stopped early by {STOP_REASONS[stopped_by]} at rung {step} ({where}): not in "
            f"the top 1/{s.reduction_factor:g} of the trials that reached it"
        )
    if stopped_by == "median":
        return (
            f"stopped early by {STOP_REASONS['median']} at {where}: its best "
            f"{cfg.tune.metric} was behind the median of the other trials' running averages"
        )
    return f"stopped early by {STOP_REASONS[stopped_by]} at {where}"


class TrialTable:
    """The sweep's live table: status, parameters, latest metric, time and rung of every
    trial. On a terminal it is redrawn in place; in a log each change is one line."""

    def __init__(self, cfg: ExperimentConfig, log=print, terminal: bool | None = None):
        self.metric = cfg.tune.metric
        self.keys = sorted(cfg.tune.space)
        self.attr = time_attr(cfg)
        self.cfg = cfg
        self.log = log
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.rows: dict[str, dict[str, Any]] = {}
        self._drawn = 0
        self._last_draw = 0.0

    def update(self, trial_id: str, status: str, config: dict, result: dict | None) -> None:
        row = self.rows.setdefault(trial_id, {"metric": None, "time": None})
        row["status"] = status
        row["params"] = {k: config[k] for k in self.keys if k in config}
        if result:
            if result.get(self.metric) is not None:
                row["metric"] = result[self.metric]
            if result.get(self.attr) is not None:
                row["time"] = float(result[self.attr])
        if self.terminal:
            self._redraw(force=status != "RUNNING")
        else:
            self.log(self.line(trial_id))

    def line(self, trial_id: str) -> str:
        row = self.rows[trial_id]
        metric = "-" if row["metric"] is None else f"{row['metric']:.4f}"
        reached = "-" if row["time"] is None else f"{row['time']:g}"
        step = rung(self.cfg, row["time"] or 0.0)
        rung_text = "" if step is None else f" rung {step}"
        params = " ".join(f"{k}={_short(v)}" for k, v in row["params"].items())
        return (
            f"[tune] trial {trial_id} {row['status']:<10} {self.attr} {reached}{rung_text} "
            f"{self.metric} {metric} {params}"
        )

    def _redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:
            return
        self._last_draw = now
        lines = [self.line(trial_id) for trial_id in self.rows]
        out = sys.stdout
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F\x1b[J")  # back to the table's first line
        out.write("\n".join(lines) + "\n")
        out.flush()
        self._drawn = len(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table_callback(cfg: ExperimentConfig, log=print) -> TableCallback:
    """A Tune callback feeding ``TrialTable`` from the driver's trial events."""
    return TableCallback(cfg, log)


class TableCallback(Callback):
    """Tune pickles its callbacks with the sweep's state, and ``Tuner.restore`` brings them
    back: a log that cannot be pickled (a notebook's ``print``) is replaced by ``print``."""

    def __init__(self, cfg: ExperimentConfig, log=print):
        self.table = TrialTable(cfg, log)

    def __getstate__(self):
        from ray import cloudpickle

        log = self.table.log
        try:
            cloudpickle.dumps(log)
        except Exception:  # noqa: BLE001 - whatever keeps it from pickling
            log = None
        return {"cfg": self.table.cfg, "log": log}

    def __setstate__(self, state):
        self.table = TrialTable(state["cfg"], state["log"] or print)

    def _show(self, trial, status: str | None = None, result: dict | None = None):
        self.table.update(
            trial.trial_id, status or trial.status, trial.config or {}, result or trial.last_result
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trial, "RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._show(trial, "RUNNING", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trial, "DONE")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trial, "ERROR")


def best_config_yaml(cfg: ExperimentConfig, values: dict[str, Any], header: str) -> str:
    """The config with the best trial's values and tune.enabled false: YAML that
    ``lepton-ray train`` accepts as it is (validated here)."""
    import yaml

    from lepton_ray.config import apply_overrides

    # apply_overrides validates the result: the YAML below is a config that validates.
    best = apply_overrides(cfg, {**values, "tune.enabled": False})
    raw = best.model_dump(mode="json", exclude_defaults=False)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(raw, sort_keys=False)


def optuna_figures(
    dims: list[Dimension], mode: str, points: list[tuple[dict[str, Any], float]], log=print
) -> dict[str, Any]:
    """Optuna's optimization history, parameter importances and parallel coordinates of the
    finished trials, as matplotlib figures by artifact path (a plot Optuna cannot draw for
    these trials, e.g. importances of one trial, is skipped with a line saying why)."""
    import warnings

    from optuna.visualization import matplotlib as ovm

    from lepton_ray.tune.space import study_of

    study = study_of(dims, mode, [(p, v) for p, v in points if v is not None and math.isfinite(v)])
    figures: dict[str, Any] = {}
    plots = {
        "plots/optuna_history.png": ovm.plot_optimization_history,
        "plots/optuna_importances.png": ovm.plot_param_importances,
        "plots/optuna_parallel_coordinates.png": ovm.plot_parallel_coordinate,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, draw in plots.items():
            try:
                axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                log(f"[tune] {path} skipped: {err}")
                continue
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            figure = first.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figures[path] = figure
    return figures
