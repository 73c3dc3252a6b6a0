"""The model registry: versions with lineage, ``@champion`` / ``@challenger``, the promotion
gate, rollback, and packaging every version as a standard MLflow pyfunc model.

- Every candidate (a trained model, a compression of one) is registered as a new version of
  the experiment's registered model and marked ``@challenger``.
- ``@champion`` is what is served, compressed or not. A compressed version names the
  version it was made from in ``lepton.source_version``.
- ``promote`` moves ``@champion``; with the gate on, only a version whose validation metric
  (on the same evaluation split) is at least the champion's minus a tolerance. Each champion
  is pushed onto a history kept as a registered-model tag, which ``rollback`` pops.
- A registry written before ``@champion`` meant "served" (``@champion`` = trained model,
  ``@serving`` = its int8 version) is migrated by the first write (register, promote,
  rollback): ``@champion`` moves to the ``@serving`` version and ``@serving`` goes. Reads
  never rewrite the registry.
- A registry that does not answer (unreachable, refusing) is an error, never "no champion".
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from lepton_ray.config import metric_mode
from lepton_ray.errors import LeptonError, StageError
from lepton_ray.tracking.mlflow import CHAMPION

CHALLENGER = "challenger"
LEGACY_SERVING = "serving"

TAG_SOURCE_VERSION = "lepton.source_version"
TAG_QUANTIZATION = "lepton.quantization"
TAG_PEFT = "lepton.peft_method"
TAG_EVAL_SPLIT = "lepton.eval_split"
TAG_METRIC_NAME = "lepton.metric_name"
TAG_METRIC_MODE = "lepton.metric_mode"
METRIC_PREFIX = "lepton.metric."
TAG_HISTORY = "lepton.champion_history"
PACKAGE_PATH = "registered_model"
"""Artifact path (in the producing run) of the MLflow pyfunc package of a version."""

_REQUIREMENTS = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "peft",
    "pydantic",
    "pyyaml",
    "numpy",
    "pandas",
)


# ---------------------------------------------------------------------------- reading specs
def _client(uri: str):
    from lepton_ray.tracking.mlflow import client

    return client(uri)


def registered_model(uri: str, name: str):
    """The registered model ``name``; a ``StageError`` when the store has none."""
    from lepton_ray.tracking.mlflow import find_registered_model, redact_uri

    found = find_registered_model(uri, name)
    if found is None:
        raise StageError(f"no registered model '{name}' in {redact_uri(uri)}")
    return found


def resolve(uri: str, spec: str):
    """The version behind a spec (``NAME`` = ``NAME@champion``, ``NAME@ALIAS``,
    ``NAME/VERSION``); reading it changes nothing in the registry."""
    from lepton_ray.tracking.mlflow import get_model_version

    return get_model_version(uri, spec)


def migrate_legacy_aliases(uri: str, name: str, log=print) -> bool:
    """Fold a pre-registry-issue ``@serving`` into ``@champion``; True when something moved.

    Called by the commands that write the registry (register, promote, rollback) only:
    reading a registry never rewrites it.
    """
    from lepton_ray.tracking.mlflow import get_version_by_alias

    serving = get_version_by_alias(uri, name, LEGACY_SERVING)
    if serving is None:
        return False
    champion = get_version_by_alias(uri, name, CHAMPION)
    if champion is not None and serving.tags.get(TAG_SOURCE_VERSION) == str(champion.version):
        _set_champion(uri, name, serving.version, previous=champion.version)
        log(
            f"[registry] migrated {name}: @champion v{champion.version} -> v{serving.version} "
            f"(its compression, formerly @serving)"
        )
    else:
        log(
            f"[registry] migrated {name}: dropped @serving v{serving.version} (a stale compression)"
        )
    _client(uri).delete_registered_model_alias(name, LEGACY_SERVING)
    return True


# -------------------------------------------------------------------------------- packaging
def _requirements(meta_weights: str) -> list[str]:
    names = list(_REQUIREMENTS)
    if "onnx" in meta_weights:
        names.append("onnxruntime")
    pins = []
    for dist in names:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{dist}=={version.split('+')[0]}")
    return pins


def package_pyfunc(artifact: Path, dst: Path) -> Path:
    """Wrap a lepton-ray model artifact folder as an MLflow pyfunc model folder at ``dst``.

    The pyfunc is defined by code (``registry/pyfunc_model.py``), not by a pickled object;
    the lepton-ray package goes along in ``code/`` so a reader needs only MLflow and the
    pinned libraries.
    """
    import mlflow.pyfunc

    import lepton_ray
    from lepton_ray.artifacts import ModelMeta
    from lepton_ray.registry import pyfunc_model

    meta = ModelMeta.load(artifact)
    with tempfile.TemporaryDirectory(prefix="lepton-code-") as tmp:
        code = Path(tmp) / "lepton_ray"
        shutil.copytree(
            Path(lepton_ray.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__")
        )
        mlflow.pyfunc.save_model(
            path=str(dst),
            python_model=str(Path(pyfunc_model.__file__)),
            artifacts={pyfunc_model.ARTIFACT_KEY: str(artifact)},
            code_paths=[str(code)],
            pip_requirements=_requirements(meta.weights),
            signature=pyfunc_model.signature(meta.task, meta.labels),
        )
    return dst


# ----------------------------------------------------------------------------- registering
@dataclass
class Candidate:
    """What a new version records besides the lineage tags of its run."""

    metrics: dict[str, float]
    metric_name: str
    metric_mode: str
    eval_split: str
    peft_method: str
    quantization: str = "none"
    source_version: str | None = None
    extra_tags: dict[str, str] | None = None

    def tags(self) -> dict[str, str]:
        tags = {
            TAG_METRIC_NAME: self.metric_name,
            TAG_METRIC_MODE: self.metric_mode,
            TAG_EVAL_SPLIT: self.eval_split,
            TAG_PEFT: self.peft_method,
            TAG_QUANTIZATION: self.quantization,
            **{
                f"{METRIC_PREFIX}{k}": f"{float(v):.6g}"
                for k, v in self.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            },
        }
        if self.source_version is not None:
            tags[TAG_SOURCE_VERSION] = str(self.source_version)
        tags.update(self.extra_tags or {})
        return tags


def register(
    uri: str,
    name: str,
    run_id: str,
    artifact: Path,
    lineage: dict[str, str],
    candidate: Candidate,
    description: str = "",
    log=print,
):
    """Package ``artifact`` as a pyfunc under the run, register it, mark it ``@challenger``."""
    from lepton_ray.tracking.mlflow import log_folder, register_version

    migrate_legacy_aliases(uri, name, log=log)
    with tempfile.TemporaryDirectory(prefix="lepton-pyfunc-") as tmp:
        package = package_pyfunc(artifact, Path(tmp) / "package")
        log_folder(uri, run_id, package, PACKAGE_PATH)
    tags = {**lineage, "lepton.run_id": run_id, **candidate.tags()}
    return register_version(
        uri, name, run_id, PACKAGE_PATH, tags, alias=CHALLENGER, description=description
    )


def run_artifact(uri: str, run_id: str, path: str, dst: Path) -> Path:
    """Download ``runs:/<run_id>/<path>`` into ``dst``."""
    import mlflow.artifacts

    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri
        )
    )


# -------------------------------------------------------------------------- champion moves
def history(uri: str, name: str) -> list[str]:
    raw = registered_model(uri, name).tags.get(TAG_HISTORY, "[]")
    try:
        values = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [str(v) for v in values] if isinstance(values, list) else []


def _set_champion(uri: str, name: str, version: str, previous: str | None) -> None:
    c = _client(uri)
    past = history(uri, name)
    if previous is not None and (not past or past[-1] != str(previous)):
        past.append(str(previous))  # a champion set before history was kept
    if not past or past[-1] != str(version):
        past.append(str(version))
    c.set_registered_model_alias(name, CHAMPION, str(version))
    c.set_registered_model_tag(name, TAG_HISTORY, json.dumps(past[-50:]))


@dataclass
class GateResult:
    passed: bool
    reason: str


def _metric(version, metric: str) -> float | None:
    raw = (version.tags or {}).get(f"{METRIC_PREFIX}{metric}")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def gate(candidate, champion, tolerance: float, evaluate=None) -> GateResult:
    """Whether ``candidate`` may replace ``champion``.

    Compared on the candidate's gate metric (``lepton.metric_name``, max or min), from the
    versions' tags when both were evaluated on the same split; otherwise ``evaluate`` (a
    callable version -> metric on one split, when the caller has the data) scores both, and
    refuses (a ``LeptonError``) a version it cannot score, which the gate then refuses.
    A compression of the champion itself was already gated by ``compress.max_drop``.
    """
    if champion is None:
        return GateResult(True, "no champion yet")
    if str(candidate.version) == str(champion.version):
        return GateResult(True, "already the champion")
    tags = candidate.tags or {}
    if tags.get(TAG_SOURCE_VERSION) == str(champion.version):
        return GateResult(
            True, f"a compression of champion v{champion.version} (gated by max_drop)"
        )
    metric = tags.get(TAG_METRIC_NAME) or (champion.tags or {}).get(TAG_METRIC_NAME)
    if not metric:
        return GateResult(False, f"v{candidate.version} records no validation metric to gate on")
    # A version recorded before tune.mode was checked may carry a contradicting mode.
    mode = metric_mode(metric) or tags.get(TAG_METRIC_MODE, "max")
    same_split = tags.get(TAG_EVAL_SPLIT) and tags.get(TAG_EVAL_SPLIT) == (champion.tags or {}).get(
        TAG_EVAL_SPLIT
    )
    if same_split:
        mine, theirs = _metric(candidate, metric), _metric(champion, metric)
        where = "their shared validation split"
    elif evaluate is not None:
        try:
            mine, theirs = evaluate(candidate), evaluate(champion)
        except LeptonError as err:  # e.g. a champion that predicts other labels
            return GateResult(
                False,
                f"v{candidate.version} and champion v{champion.version} cannot be compared: {err}",
            )
        where = "this experiment's validation texts (evaluated now, each by its own preprocessing)"
    else:
        return GateResult(
            False,
            f"v{candidate.version} and champion v{champion.version} were evaluated on different "
            "splits; pass the experiment config to score both on its validation split, or --force",
        )
    if mine is None or theirs is None:
        return GateResult(
            False, f"{metric} is missing on v{candidate.version} or v{champion.version}"
        )
    ok = mine >= theirs - tolerance if mode == "max" else mine <= theirs + tolerance
    sign = "-" if mode == "max" else "+"
    verdict = "passes" if ok else "fails"
    return GateResult(
        ok,
        f"{verdict}: {metric} {mine:.4f} (v{candidate.version}) against {theirs:.4f} "
        f"(champion v{champion.version}) {sign} tolerance {tolerance:g}, on {where}",
    )


def promote(
    uri: str,
    name: str,
    version: str,
    *,
    tolerance: float = 0.0,
    force: bool = False,
    evaluate=None,
    log=print,
) -> GateResult:
    """Make ``name/version`` the champion if the gate passes (or ``force``).

    A registry that cannot say who the champion is (unreachable, refusing) stops the
    promotion with a ``StageError``: it is never taken for a registry without a champion.
    """
    from lepton_ray.tracking.mlflow import get_version_by_alias

    c = _client(uri)
    migrate_legacy_aliases(uri, name, log=log)
    candidate = resolve(uri, f"{name}/{version}")
    try:
        champion = get_version_by_alias(uri, name, CHAMPION)
    except StageError as err:
        raise StageError(f"{name} v{version} not promoted: {err}") from None
    result = GateResult(True, "forced") if force else gate(candidate, champion, tolerance, evaluate)
    if not result.passed:
        log(f"[registry] {name} v{version} not promoted: {result.reason}")
        return result
    _set_champion(uri, name, str(version), champion.version if champion else None)
    challenger = get_version_by_alias(uri, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        c.delete_registered_model_alias(name, CHALLENGER)
    c.set_model_version_tag(name, str(version), "lepton.promoted", result.reason[:500])
    was = f" (was v{champion.version})" if champion else ""
    log(f"[registry] {name} @champion -> v{version}{was}: {result.reason}")
    return result


def rollback(uri: str, name: str, log=print) -> str:
    """Point ``@champion`` back at the previous champion; returns its version."""
    from lepton_ray.tracking.mlflow import find_model_version, get_version_by_alias

    migrate_legacy_aliases(uri, name, log=log)
    champion = get_version_by_alias(uri, name, CHAMPION)
    if champion is None:
        raise StageError(f"registered model '{name}' has no @champion to roll back")
    past = history(uri, name)
    while past and past[-1] == str(champion.version):
        past.pop()
    c = _client(uri)
    while past:
        previous = past[-1]
        if find_model_version(uri, name, previous) is None:  # deleted: skip it
            past.pop()
            continue
        c.set_registered_model_alias(name, CHAMPION, previous)
        c.set_registered_model_tag(name, TAG_HISTORY, json.dumps(past))
        log(f"[registry] {name} @champion rolled back: v{champion.version} -> v{previous}")
        return previous
    raise StageError(
        f"registered model '{name}' has no previous champion to roll back to "
        f"(v{champion.version} is the first)"
    )


# ------------------------------------------------------------------------------- reading
def describe(version, aliases: list[str]) -> dict[str, Any]:
    tags = dict(version.tags or {})
    return {
        "name": version.name,
        "version": str(version.version),
        "aliases": aliases,
        "run_id": version.run_id,
        "source": version.source,
        "created": version.creation_timestamp,
        "description": version.description or "",
        "quantization": tags.get(TAG_QUANTIZATION, "none"),
        "peft_method": tags.get(TAG_PEFT, ""),
        "source_version": tags.get(TAG_SOURCE_VERSION),
        "metrics": {
            k.removeprefix(METRIC_PREFIX): v for k, v in tags.items() if k.startswith(METRIC_PREFIX)
        },
        "lineage": {
            k: v
            for k, v in tags.items()
            if k.startswith("lepton.") and not k.startswith(METRIC_PREFIX)
        },
    }


def list_versions(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every version (of ``name``, or of every registered model), newest first; a read:
    a legacy ``@serving`` alias is listed as it is, not migrated."""
    c = _client(uri)
    if name is not None:
        registered_model(uri, name)
        names = [name]
    else:
        names = [m.name for m in c.search_registered_models()]
    rows = []
    for n in names:
        aliases: dict[str, list[str]] = {}
        for alias, v in (registered_model(uri, n).aliases or {}).items():
            aliases.setdefault(str(v), []).append(alias)
        for v in c.search_model_versions(f"name='{n}'"):
            rows.append(describe(v, sorted(aliases.get(str(v.version), []))))
    rows.sort(key=lambda r: (r["name"], -int(r["version"])))
    return rows
