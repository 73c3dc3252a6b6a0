"""The ``tune`` section (the Ray Tune sweep: search space, ASHA scheduler), the metrics
training reports, and which config keys a sweep may search."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lepton_ray.config.base import Section
from lepton_ray.tasks import TASKS


class SearchParam(Section):
    type: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> SearchParam:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' parameter needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a '{self.type}' parameter needs 'low' and 'high'")
            if self.low >= self.high:
                raise ValueError(f"'low' ({self.low}) must be below 'high' ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("a 'loguniform' parameter needs 'low' > 0")
        return self


class AshaSection(Section):
    """Fields of ``ray.tune.schedulers.ASHAScheduler`` (time unit: epochs)."""

    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can stop.")
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneSection(Section):
    enabled: bool = Field(True, description="Sweep with Tune; otherwise train one model.")
    num_samples: int = Field(4, ge=1, description="Trials; the first uses the config's values.")
    metric: str = Field("val_accuracy", description="Reported metric to optimise.")
    mode: Literal["max", "min"] | None = Field(
        None,
        description="Default: what tune.metric needs (min for a loss; max for accuracy, F1, "
        "precision, recall, AUC); a contradicting value is refused.",
    )
    space: dict[str, SearchParam] = Field(
        default_factory=dict, description="Dotted config key -> distribution."
    )
    scheduler: AshaSection = Field(default_factory=AshaSection)
    max_concurrent_trials: int | None = Field(None, ge=1, description="Default: fits the cluster.")
    seed: int = 0

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
TUNABLE_KEYS = {"data.packing"}
"""Keys outside TUNABLE_SECTIONS a sweep may search: packing is applied when batching."""
UNTUNABLE_REASON = (
    "a sweep can search keys under train.* and peft.* (e.g. train.lr, peft.lora.r), except "
    "train.epochs (the ASHA budget), and data.packing; other data.* and model.* are fixed for a sweep because every "
    "trial trains on the data tokenized once for model.name"
)
