"""The ``tune`` section (the Ray Tune sweep: search space, searcher, scheduler), the metrics
training reports, and which config keys a sweep may search."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lepton_ray.config.base import Section
from lepton_ray.tasks import TASKS


class SearchParam(Section):
    """One searched config key: a distribution, optionally conditional (``when``) or a
    multiple of another key (``ratio_of``)."""

    type: Literal["uniform", "loguniform", "int", "choice", "grid"] | None = Field(
        None,
        description="'grid' enumerates its values (tune.search: grid). Required, except "
        "for a ratio_of parameter (a choice among its multipliers).",
    )
    low: float | None = None
    high: float | None = None
    step: float | None = Field(
        None, gt=0, description="'int' and 'uniform': sample on this grid from low."
    )
    log: bool = Field(False, description="'int': sample on a log scale.")
    values: list[Any] | None = Field(
        None, description="'choice', 'grid' and ratio_of: the values (or multipliers)."
    )
    when: dict[str, Any] | None = Field(
        None,
        description="Only under this branch: {other searched key: value or [values]}, e.g. "
        "{peft.method: lora}. A key may list several variants, each with its own 'when'.",
    )
    ratio_of: str | None = Field(
        None,
        description="The value is one of 'values' times this key's value (searched or "
        "fixed), e.g. lora_alpha: {ratio_of: peft.lora.r, values: [1, 2, 4]}.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> SearchParam:
        if self.ratio_of is not None:
            if self.type not in (None, "choice"):
                raise ValueError("a 'ratio_of' parameter takes 'values' (multipliers), no 'type'")
            if not self.values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                for v in self.values
            ):
                raise ValueError("a 'ratio_of' parameter needs 'values': positive multipliers")
            return self
        if self.type is None:
            raise ValueError("a parameter needs a 'type' (uniform, loguniform, int, choice, grid)")
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a '{self.type}' parameter needs a non-empty 'values' list")
            if len({repr(v) for v in self.values}) != len(self.values):
                raise ValueError(f"a '{self.type}' parameter lists a value twice")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a '{self.type}' parameter needs 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("a 'loguniform' parameter needs 'low' > 0")
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high):
                raise ValueError("an 'int' parameter needs whole 'low' and 'high'")
            if self.step is not None and self.step != int(self.step):
                raise ValueError("an 'int' parameter needs a whole 'step'")
            if self.log and (self.low < 1 or self.step not in (None, 1)):
                raise ValueError("an 'int' parameter with 'log' needs 'low' >= 1 and no 'step'")
        elif self.log:
            raise ValueError("'log' is for 'int' parameters (use type: loguniform)")
        if self.step is not None and self.type == "loguniform":
            raise ValueError("'step' is for 'int' and 'uniform' parameters")
        return self


SpaceEntry = SearchParam | list[SearchParam]


class SchedulerSection(Section):
    """Early stopping across trials: Ray Tune's ASHA, median stopping rule, HyperBand, or
    none (every trial runs its epochs)."""

    type: Literal["asha", "median", "hyperband", "none"] = "asha"
    time_attr: Literal["epoch", "step"] = Field(
        "epoch", description="The unit of grace_period and max_t: epochs or optimizer steps."
    )
    grace_period: int = Field(1, ge=1, description="Time every trial runs before it can stop.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA and HyperBand.")
    max_t: int | None = Field(
        None, ge=1, description="Default: train.epochs, or every step of train.epochs."
    )
    min_samples_required: int = Field(
        3, ge=1, description="median: trials that must have reached a time before it stops one."
    )


SEARCHERS = ("tpe", "random", "grid", "cmaes", "gp")


class LatencyConstraints(Section):
    """Latency a served model must meet (``tune.objective: served``): a trial whose served
    model is slower is never the winner, and a sweep where none meets them registers
    nothing."""

    p50_ms: float | None = Field(
        None, gt=0, description="Median milliseconds of a one-row forward pass (batch 1)."
    )
    p50_ms_batch: float | None = Field(
        None,
        gt=0,
        description="Median milliseconds of a forward pass at the serving batch size "
        "(tune.served_batch_size).",
    )

    def active(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TuneSection(Section):
    enabled: bool = Field(
        False,
        description="Sweep with Tune (`lepton-ray run`); otherwise train one model. "
        "Default: true when tune.space is given.",
    )
    num_samples: int = Field(
        4, ge=1, description="Trials; the first uses the config's values (except in a grid)."
    )
    metric: str = Field("val_accuracy", description="Reported metric to optimise.")
    mode: Literal["max", "min"] | None = Field(
        None,
        description="Default: what tune.metric needs (min for a loss; max for accuracy, F1, "
        "precision, recall, AUC); a contradicting value is refused.",
    )
    space: dict[str, SpaceEntry] = Field(
        default_factory=dict,
        description="Dotted config key -> distribution (or a list of variants, each with "
        "its own 'when').",
    )
    search: Literal["tpe", "random", "grid", "cmaes", "gp"] = Field(
        "tpe",
        description="Optuna sampler: TPE (multivariate), random, grid, CMA-ES or a Gaussian "
        "process; each seeded with tune.seed.",
    )
    startup_trials: int | None = Field(
        None,
        ge=0,
        description="Random trials before TPE, CMA-ES or GP model the results. "
        "Default: a third of num_samples, from 2 to 10.",
    )
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: fits the cluster.")
    max_failures: int = Field(
        0, ge=0, description="Retries of a failed trial before it is recorded as failed."
    )
    warm_start: str | None = Field(
        None,
        description="An MLflow experiment whose finished sweep trials (their points and "
        "results) seed the searcher.",
    )
    seed: int = 0
    objective: Literal["validation", "served"] = Field(
        "validation",
        description="'validation': the best trial is the one with the best tune.metric as "
        "trained. 'served': the tune.served_top_k best are merged and compressed with the "
        "compress stage's code, scored on validation in that form and timed; the best served "
        "tune.metric (within tune.constraints) wins.",
    )
    served_top_k: int = Field(
        3, ge=1, description="objective served: the trials, best first, scored as served."
    )
    served_batch_size: int | None = Field(
        None,
        ge=1,
        description="objective served: the batch latency is timed at. "
        "Default: serve.max_batch_size.",
    )
    latency_objective: bool = Field(
        False,
        description="objective served: latency at batch 1 is a second objective (Optuna "
        "multi-objective); the summary gives the Pareto front of the served trials, and the "
        "winner is the front's best tune.metric.",
    )
    constraints: LatencyConstraints = Field(default_factory=LatencyConstraints)

    @model_validator(mode="after")
    def _served_settings(self) -> TuneSection:
        if self.objective != "served":
            given = [
                name
                for name, on in (
                    ("tune.constraints", bool(self.constraints.active())),
                    ("tune.latency_objective", self.latency_objective),
                )
                if on
            ]
            if given:
                raise ValueError(
                    f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to "
                    "served models: set tune.objective: served"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _enabled_by_a_space(cls, data: Any) -> Any:
        if isinstance(data, dict) and "enabled" not in data:
            data = {**data, "enabled": bool(data.get("space"))}
        return data

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in REPORTED_METRICS:
            raise ValueError(f"unknown metric '{value}'; choose one of {sorted(REPORTED_METRICS)}")
        return value

    @field_validator("mode")
    @classmethod
    def _mode_of_metric(cls, value: str | None, info: ValidationInfo) -> str:
        metric = info.data.get("metric")  # absent when tune.metric itself was refused
        needed = metric_mode(metric) if metric else None
        if value is None:
            return needed or "max"
        if needed is not None and value != needed:
            raise ValueError(
                f"tune.mode {value} contradicts tune.metric {metric}, which is "
                f"{'minimised' if needed == 'min' else 'maximised'}; set tune.mode: {needed} "
                "or leave tune.mode out"
            )
        return value


def metric_mode(metric: str) -> Literal["max", "min"] | None:
    """The direction a metric is optimised in, by its name: a loss and a perplexity are
    minimised; accuracy, F1, precision, recall, AUC and generation scores (exact match,
    ROUGE, GSM8K) are maximised; None for a name that says neither."""
    name = metric.lower()
    if name.endswith(("loss", "perplexity")):
        return "min"
    words = ("accuracy", "f1", "precision", "recall", "auc", "exact_match", "rouge", "gsm8k")
    if any(word in name for word in words):
        return "max"
    return None


REPORTED_METRICS = sorted({metric for task in TASKS.values() for metric in task.metrics})
"""Every metric some task reports; ``ExperimentConfig`` checks ``tune.metric`` against its own
task's (``tasks.Task.metrics``)."""


TUNABLE_SECTIONS = {"train", "peft"}
UNTUNABLE_KEYS = {"train.epochs"}
TUNABLE_KEYS = {"data.packing", "data.max_length"}
"""Keys outside TUNABLE_SECTIONS a sweep may search: packing is applied when batching, and a
trial cuts the rows (tokenized once at ``data.max_length``) to its own shorter length."""
UNTUNABLE_REASON = (
    "a sweep can search keys under train.* and peft.* (e.g. train.lr, peft.lora.r), except "
    "train.epochs (the ASHA budget), and data.packing and data.max_length (up to the "
    "config's own); other data.* and model.* are fixed for a sweep because every trial "
    "trains on the data tokenized once for model.name"
)
