"""The ``tracking`` section (MLflow store, experiment and model names) and the ``registry``
section (how a new model version reaches ``@champion``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from lepton_ray.config.base import Section


class TrackingSection(Section):
    tracking_uri: str = Field(
        "sqlite:///mlruns/mlflow.db", description="MLflow tracking URI (relative = to the CWD)."
    )
    artifact_location: str = Field("mlruns/artifacts", description="Where artifacts are stored.")
    experiment_name: str | None = Field(None, description="Default: the experiment's name.")
    registered_model_name: str | None = Field(None, description="Default: the experiment's name.")

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_sqlite(cls, value: str) -> str:
        # Ray workers run in other folders, so a relative store must be pinned here.
        prefix = "sqlite:///"
        if value.startswith(prefix) and not value[len(prefix) :].startswith("/"):
            db = Path(value[len(prefix) :]).resolve()
            return prefix + str(db)
        if "://" not in value:
            return str(Path(value).resolve())
        return value

    @field_validator("artifact_location")
    @classmethod
    def _absolute_artifacts(cls, value: str) -> str:
        return value if "://" in value else str(Path(value).resolve())


class RegistrySection(Section):
    """How a new model version reaches ``@champion`` (the version that is served).

    Every trained (or compressed) candidate is registered and marked ``@challenger``. It is
    promoted to ``@champion`` when there is no champion yet, or, with ``promotion: gated``,
    when its ``tune.metric`` on the same validation split is at least the champion's minus
    ``tolerance`` (at most, for a metric minimised). ``manual`` leaves promotion to
    ``lepton-ray models promote``.
    """

    promotion: Literal["gated", "always", "manual"] = Field(
        "gated", description="gated: only a challenger at least as good as the champion."
    )
    tolerance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="How much worse than the champion (in tune.metric units, e.g. 0.005 = "
        "half an accuracy point) a challenger may be and still be promoted.",
    )
