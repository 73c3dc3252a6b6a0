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


def experiment_runs(cfg: ExperimentConfig, filter_string: str, max_results: int = 1000):
    """Runs of the config's experiment matching ``filter_string``, newest first; none when
    the experiment does not exist yet."""
    c = client(cfg.tracking.tracking_uri)
    experiment = c.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        return []
    return c.search_runs(
        [experiment.experiment_id],
        filter_string=filter_string,
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


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


def log_config(
    tracking_uri: str, run_id: str, cfg: ExperimentConfig, leave_out: set[str] = frozenset()
) -> None:
    """Flattened params plus the resolved YAML as an artifact. ``leave_out``: dotted keys
    (and what is under them) not logged as params (a trial's untaken branches); settings
    the PEFT method never reads are left out too."""
    import yaml
    from mlflow.entities import Param

    c = client(tracking_uri)
    raw = redacted_config(cfg)
    leave_out = set(leave_out) | cfg.peft.unused_keys()
    flat = {
        k: v
        for k, v in _flatten(raw).items()
        if not any(k == key or k.startswith(key + ".") for key in leave_out)
    }
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


def log_table(tracking_uri: str, run_id: str, rows: list[dict[str, Any]], path: str) -> None:
    """A table (``mlflow.log_table``: the UI's artifact view and evaluation tab read it)."""
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    for row in rows:
        for key, values in columns.items():
            values.append(row.get(key))
    client(tracking_uri).log_table(run_id, data=columns, artifact_file=path)


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


CHAMPION = "champion"
"""The served alias; a bare ``NAME`` means ``NAME@champion``."""
_ALIAS = re.compile(r"[A-Za-z0-9_-]+")


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """The one grammar of a model: ``NAME``, ``NAME@ALIAS`` or ``NAME/VERSION``, each with an
    optional ``models:/`` prefix -> (name, alias, version); a bare NAME has neither."""
    from lepton_ray.errors import LeptonError

    rest = spec.removeprefix("models:/").strip()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and _ALIAS.fullmatch(alias):
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    elif rest:
        return rest, None, None
    raise LeptonError(f"model must look like NAME, NAME@ALIAS or NAME/VERSION, got {spec!r}")


def is_not_found(err: BaseException) -> bool:
    """Whether MLflow answered that the thing asked for does not exist."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST"


def _read(tracking_uri: str, what: str, call):
    """``call()``, or None when MLflow says it does not exist.

    Any other failure (an unreachable server, a permission error) is an error that names
    the store: an answer that did not come is never taken for "there is none", which would
    let a challenger pass the gate as if there were no champion.
    """
    from mlflow.exceptions import MlflowException

    from lepton_ray.errors import StageError

    try:
        return call()
    except MlflowException as err:
        if is_not_found(err):
            return None
        detail = redact_uri(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
        raise StageError(
            f"could not {what} in the MLflow registry at {redact_uri(tracking_uri)}: {detail}"
        ) from None


def find_registered_model(tracking_uri: str, name: str):
    """The registered model ``name``, or None when the store has none of that name."""
    return _read(
        tracking_uri,
        f"read registered model '{name}'",
        lambda: client(tracking_uri).get_registered_model(name),
    )


def find_model_version(tracking_uri: str, name: str, version: str):
    """Version ``version`` of ``name``, or None when it does not exist (or was deleted)."""
    return _read(
        tracking_uri,
        f"read version {version} of '{name}'",
        lambda: client(tracking_uri).get_model_version(name, str(version)),
    )


def get_version_by_alias(tracking_uri: str, name: str, alias: str):
    """The version behind ``name@alias``, or None when the model or the alias does not exist.

    The alias is looked up among the registered model's aliases: MLflow answers a lookup of
    a missing alias with the same error code as a malformed request, so only the model's
    own answer tells "no such alias" from a failure.
    """
    return _version_of_alias(tracking_uri, find_registered_model(tracking_uri, name), alias)


def _version_of_alias(tracking_uri: str, model, alias: str):
    """The version ``alias`` names among ``model``'s aliases (None: no model or no alias)."""
    version = (model.aliases or {}).get(alias) if model is not None else None
    return None if version is None else find_model_version(tracking_uri, model.name, str(version))


def get_model_version(tracking_uri: str, spec: str):
    """The registry entry behind a spec of :func:`parse_spec` (``NAME`` = ``NAME@champion``)."""
    from lepton_ray.errors import StageError

    name, alias, version = parse_spec(spec)
    where = redact_uri(tracking_uri)
    model = find_registered_model(tracking_uri, name)
    if model is None:
        raise StageError(
            f"no registered model '{name}' in {where} (asked for {spec}); "
            "train or tune this experiment first"
        )
    if version is not None:
        found, what = find_model_version(tracking_uri, name, version), f"version {version}"
    else:
        alias = alias or CHAMPION
        found, what = _version_of_alias(tracking_uri, model, alias), f"alias @{alias}"
    if found is None:
        raise StageError(f"no registered model {spec} in {where}: '{name}' has no {what}")
    return found


def download_model(tracking_uri: str, model_uri: str, dst: Path | None = None) -> Path:
    """Download a registered version (to a new temporary folder by default) and return the
    lepton-ray model artifact in it (inside the MLflow pyfunc package of the version)."""
    import mlflow.artifacts

    version = get_model_version(tracking_uri, model_uri)
    dst = dst or Path(tempfile.mkdtemp(prefix="lepton-model-"))
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=version.source, dst_path=str(dst), tracking_uri=tracking_uri
    )
    from lepton_ray.artifacts import artifact_folder

    return artifact_folder(Path(path))


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
