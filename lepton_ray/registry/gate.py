"""The promotion gate's side of the experiment: what a registered version scores on this
experiment's validation split, and ``registry.promotion`` applied to a new version.

The gate itself (compare, move ``@champion``) is ``registry.versions.promote``; here each
version is scored through its own preprocessing and its task's ``evaluate``, from the split's
raw texts (``raw_text``, before ``data.clean``) where the data stage kept them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.data.rows import RAW_TEXT
from lepton_ray.errors import StageError
from lepton_ray.tasks import get_task


def eval_split_id(manifest: dict[str, Any]) -> str:
    """Names the validation split a metric was measured on (the gate compares like with like)."""
    return f"{manifest.get('fingerprint', 'unknown')}:validation"


def eval_columns(cfg: ExperimentConfig, files: Sequence[Path] = ()) -> list[str]:
    """The columns of a split that scoring a version reads: the text and the task's target.

    The text is ``raw_text`` when every one of the split's ``files`` has it, else ``text``
    (the data stage's cleaned text: ``data.clean.mask_pii`` was set, or the data folder was
    written before the column existed; no ``files`` given also means ``text``).
    """
    import pyarrow.parquet as pq

    task = get_task(cfg.task)
    has_raw = bool(files) and all(RAW_TEXT in pq.read_schema(f).names for f in files)
    # A per-token target is rebuilt from the text by each version's own tokenizer.
    targets = [] if task.token_targets else [task.target_column]
    return [RAW_TEXT if has_raw else "text", *targets]


def open_eval_split(cfg: ExperimentConfig, split: str = "validation"):
    """A split of ``cfg`` streaming what scoring reads (``eval_columns``); None when empty."""
    from lepton_ray.data.split_files import open_split

    rows = open_split(cfg, split)
    if rows is not None:
        rows.columns = eval_columns(cfg, rows.files)
    return rows


def settle(cfg: ExperimentConfig, version: str, log=print) -> bool:
    """Apply ``registry.promotion`` to a new version; True when it became the champion.

    A registry that cannot say whether there is a champion stops here with a ``StageError``
    (under ``manual`` too): only a registry that answers "no champion" lets a first version
    through ungated.
    """
    from lepton_ray.registry import versions
    from lepton_ray.tracking.mlflow import get_version_by_alias

    uri, name = cfg.tracking.tracking_uri, cfg.registered_model_name
    policy = cfg.registry.promotion
    if policy == "manual" and get_version_by_alias(uri, name, versions.CHAMPION) is not None:
        log(
            f"[registry] {name} v{version} stays @{versions.CHALLENGER} (registry.promotion: "
            f"manual); promote it with: lepton-ray models promote {name}/{version}"
        )
        return False
    result = versions.promote(
        uri,
        name,
        version,
        tolerance=cfg.registry.tolerance,
        force=policy == "always",
        evaluate=lambda v: validation_metric(cfg, v),
        log=log,
    )
    return result.passed


def _texts_of(frame) -> list[str]:
    """A frame's texts as scoring reads them: ``raw_text`` where it has it, else ``text``."""
    return frame[RAW_TEXT if RAW_TEXT in frame.columns else "text"].tolist()


def score_version(cfg: ExperimentConfig, model_uri: str, frames) -> tuple[dict[str, Any], list]:
    """Evaluate a registered version on a split's texts; returns (metrics, its labels).

    ``frames``: the split's text and target (``eval_columns``) as frames in order (a
    ``data.split_files.SplitRows`` streams them from the split's files, ``open_eval_split``).
    Each version reads the texts through its own preprocessing, the cleaning, tokenizer and
    ``max_length`` its artifact carries (as it does when served), never through this
    experiment's token ids: a champion trained with another tokenizer is scored as it
    answers, not on ids it never saw.

    The texts are the raw ones (``raw_text``, before ``data.clean``) when the frames have
    that column, so each version's own cleaning is the only one applied, as serving applies
    it to what a client sends. Without it (``data.clean.mask_pii`` set: the data stage keeps
    no unmasked text; or a data folder written before the column existed) they are the
    ``text`` column, already cleaned by ``data.clean``, and each version's cleaning applies
    on top of that.

    Raises:
        StageError: the version's task or labels are not this experiment's.
    """
    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.data.preprocess import load_manifest
    from lepton_ray.tracking.mlflow import download_model

    task = get_task(cfg.task)
    labels = list(load_manifest(cfg)["labels"])
    with tempfile.TemporaryDirectory(prefix="lepton-eval-") as tmp:
        artifact = download_model(cfg.tracking.tracking_uri, model_uri, Path(tmp))
        model, tokenizer, meta = load_model_artifact(artifact)
        if meta.task != cfg.task:
            raise StageError(
                f"{model_uri} is a {meta.task} model and this experiment's task is {cfg.task}; "
                "it cannot be scored on this data"
            )
        if list(meta.labels) != labels:
            raise StageError(
                f"{model_uri} predicts the labels {list(meta.labels)} but this experiment's "
                f"data has the labels {labels}; it cannot be scored on this data"
            )
        data = task.scoring_data(frames, _texts_of, tokenizer, meta, cfg)
        return task.evaluate(model, data, labels), labels


def validation_metric(cfg: ExperimentConfig, version) -> float | None:
    """``tune.metric`` of a registered version on this experiment's validation split."""
    split = open_eval_split(cfg, "validation")
    if split is None:
        return None
    result, _ = score_version(cfg, f"models:/{version.name}/{version.version}", split)
    value = result.get(cfg.tune.metric.removeprefix("val_"))
    return float(value) if value is not None else None
