"""Thin, explicit wrappers over ``MlflowClient`` (no global active run: Ray workers and
Tune trials each hold a run id, and only rank 0 writes)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig, TrackingSection

TAG_CONFIG_HASH = "lepton.config_hash"
TAG_DATA_FINGERPRINT = "lepton.data_fingerprint"
TAG_GIT_SHA = "lepton.git_sha"
TAG_TRIAL_ID = "lepton.trial_id"
TAG_STAGE = "lepton.stage"
TAG_ERROR = "lepton.error"
TAG_PARENT = "mlflow.parentRunId"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, judges);
with it, the runs table of a model-training experiment comes first."""


@functools.lru_cache(maxsize=8)
def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(tracking: TrackingSection, name: str) -> str:
    """The experiment's id, created with the configured artifact location if new."""
    c = client(tracking.tracking_uri)
    found = c.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
            c.set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return found.experiment_id
    location = tracking.artifact_location
    if "://" not in location:
        Path(location).mkdir(parents=True, exist_ok=True)
        location = Path(location).as_uri()
    return c.create_experiment(
        name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
    )


_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def redact_uri(text: str) -> str:
    """``https://user:pass@host/...`` -> ``https://***@host/...`` (any URI in ``text``)."""
    return _URI_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)


def redacted_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as logged: every URI-like string with its credentials removed."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return redact_uri(node) if isinstance(node, str) else node

    return scrub(cfg.model_dump(mode="json"))


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parents[2],
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lineage_tags(
    cfg: ExperimentConfig, data_fingerprint: str | None, **extra: str
) -> dict[str, str]:
    tags = {TAG_CONFIG_HASH: cfg.fingerprint(), TAG_GIT_SHA: git_sha()}
    if data_fingerprint:
        tags[TAG_DATA_FINGERPRINT] = data_fingerprint
    tags.update({k: str(v) for k, v in extra.items()})
    return tags


@contextlib.contextmanager
def tracked_run(
    cfg: ExperimentConfig,
    run_name: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    settle_errors: bool = True,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """Create a run, yield its id, and close it FINISHED, FAILED or KILLED.

    A run that did not finish is never left looking complete. With ``settle_errors=False``
    an error leaves the status to the caller's owner (a Tune trial interrupted by ASHA is
    'KILLED', not 'FAILED', and only the sweep knows which it was). A failed run carries
    the error's message in the ``lepton.error`` tag. ``resume_run_id`` reopens that run
    (marked RUNNING again) instead of creating one.
    """
    c = client(cfg.tracking.tracking_uri)
    experiment_id = ensure_experiment(cfg.tracking, cfg.experiment_name)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[TAG_PARENT] = parent_run_id
    if resume_run_id:
        run_id = resume_run_id
        c.update_run(run_id, status="RUNNING")
        for key, value in all_tags.items():
            c.set_tag(run_id, key, value)
        c.set_tag(run_id, TAG_ERROR, "")
    else:
        run_id = c.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    try:
        yield run_id
    except KeyboardInterrupt:
        if settle_errors:
            c.set_tag(run_id, TAG_ERROR, "interrupted (signal)")
            c.set_terminated(run_id, status="KILLED")
        raise
    except BaseException as err:
        from lepton_ray.errors import INTERRUPTED

        if settle_errors:
            # A signal may surface as another error (Ray wraps what it interrupts).
            killed = INTERRUPTED.is_set()
            message = "interrupted (signal)" if killed else f"{type(err).__name__}: {err}"
            c.set_tag(run_id, TAG_ERROR, redact_uri(message)[:5000])
            c.set_terminated(run_id, status="KILLED" if killed else "FAILED")
        raise
    else:
        c.set_terminated(run_id, status="FINISHED")


def log_config(tracking_uri: str, run_id: str, cfg: ExperimentConfig) -> None:
    """Flattened params plus the resolved YAML as an artifact."""
    import yaml
    from mlflow.entities import Param

    c = client(tracking_uri)
    raw = redacted_config(cfg)
    flat = _flatten(raw)
    params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(params), 100):
        c.log_batch(run_id, params=params[i : i + 100])
    c.log_text(run_id, yaml.safe_dump(raw, sort_keys=False), "config/resolved.yaml")


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    client(tracking_uri).log_batch(run_id, metrics=batch)


def log_dict(tracking_uri: str, run_id: str, data: dict, path: str) -> None:
    client(tracking_uri).log_text(run_id, json.dumps(data, indent=2, default=str), path)


def log_figure(tracking_uri: str, run_id: str, figure, path: str) -> None:
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / Path(path).name
        file.write_bytes(buf.getvalue())
        client(tracking_uri).log_artifact(
            run_id, str(file), str(Path(path).parent) if "/" in path else None
        )
    import matplotlib.pyplot as plt

    plt.close(figure)


def log_folder(tracking_uri: str, run_id: str, folder: Path, artifact_path: str) -> None:
    client(tracking_uri).log_artifacts(run_id, str(folder), artifact_path)


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    c = client(tracking_uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


# ------------------------------------------------------------------------------------ registry
def register_version(
    tracking_uri: str,
    name: str,
    run_id: str,
    artifact_path: str,
    tags: dict[str, str],
    alias: str | None = None,
    description: str = "",
):
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of ``name``."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(name)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = c.create_model_version(
        name, source=source, run_id=run_id, tags=tags, description=description
    )
    if alias:
        c.set_registered_model_alias(name, alias, version.version)
    return version


def get_version_by_alias(tracking_uri: str, name: str, alias: str):
    """The version behind ``name@alias``, or None when the alias (or model) does not exist."""
    try:
        return client(tracking_uri).get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MLflow raises a generic error for a missing alias
        return None


def remove_alias(tracking_uri: str, name: str, alias: str) -> bool:
    """Delete ``name@alias``; False when it was not set."""
    if get_version_by_alias(tracking_uri, name, alias) is None:
        return False
    client(tracking_uri).delete_registered_model_alias(name, alias)
    return True


def get_model_version(tracking_uri: str, model_uri: str):
    """The registry entry behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from lepton_ray.errors import StageError

    c = client(tracking_uri)
    name, version = _parse_model_uri(model_uri)
    try:
        if version.startswith("@"):
            return c.get_model_version_by_alias(name, version[1:])
        return c.get_model_version(name, version)
    except Exception as err:  # noqa: BLE001 - MLflow raises generic errors for missing models
        raise StageError(
            f"no registered model {model_uri} in {redact_uri(tracking_uri)} "
            f"({str(err).splitlines()[0]}); train or tune this experiment first"
        ) from None


def download_model(tracking_uri: str, model_uri: str, dst: Path | None = None) -> Path:
    """Download a registered version (to a new temporary folder by default) and return the
    lepton-ray model artifact in it (inside the MLflow pyfunc package of the version)."""
    import mlflow.artifacts

    from lepton_ray.registry import artifact_folder

    version = get_model_version(tracking_uri, model_uri)
    dst = dst or Path(tempfile.mkdtemp(prefix="lepton-model-"))
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=version.source, dst_path=str(dst), tracking_uri=tracking_uri
    )
    return artifact_folder(Path(path))


def _parse_model_uri(uri: str) -> tuple[str, str]:
    from lepton_ray.errors import LeptonError

    if not uri.startswith("models:/"):
        raise LeptonError(
            f"model URI must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}"
        )
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, "@" + alias
    name, _, version = rest.rpartition("/")
    if not name or not version:
        raise LeptonError(
            f"model URI must look like models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}"
        )
    return name, version


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("space", "config_overrides"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
