"""``run_retrain``: continue fine-tuning a registered version on new data, then gate it.

The steps, each logged under one MLflow parent run ``retrain`` with lineage tags:

1. resolve ``--from`` (``NAME@champion`` by default; a compressed version is traced back to
   the float version it was made from, since int8 weights cannot be trained further);
2. preprocess the new data with the experiment's own data settings, into a folder of its
   own (the experiment's preprocessed data is left as it is). Its validation and test rows
   must be new to the model: the hash split's boundaries move with the data (and the old
   ``split.files`` do not apply), so rows whose text that version trained on - the
   experiment's training split, the replay sample's source, and what earlier retrains
   added (``lepton.trained_on``) - are removed from them and counted;
3. optionally mix in a seeded replay sample of the experiment's old training split, read
   one Parquet row group at a time (only the sample is held);
4. train, starting from that version's weights (``model.init_from``), register the result
   as ``@challenger`` (tagged with the version it continues), compress it if the config
   compresses;
5. score the challenger and the champion on the same held-out split - the new data's
   validation split - and promote only if the gate passes;
6. if the experiment's endpoint is running, swap it to the new champion in place (no
   failed request: see ``lepton_ray.serve.app``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig, validate_experiment
from lepton_ray.errors import ConfigError, StageError
from lepton_ray.runtime.uri import Uri

TAG_RETRAINED_FROM = "lepton.retrained_from"
TAG_RETRAIN_DATA = "lepton.retrain_data"
TAG_REPLAY_ROWS = "lepton.replay_rows"
TAG_TRAINED_ON = "lepton.trained_on"
"""Preprocessed training folders whose texts a version has seen (itself or through the
version it continues), one per line: the next retrain keeps them out of evaluation."""


def _trainable_source(uri: str, spec: str, name: str):
    """The registered version to continue from (a compression's float source)."""
    from lepton_ray.registry import versions

    version = versions.resolve(uri, spec)
    if version.name != name:
        raise ConfigError(
            f"--from {spec} names registered model '{version.name}', but this experiment "
            f"registers '{name}'"
        )
    tags = version.tags or {}
    if tags.get(versions.TAG_QUANTIZATION, "none") != "none":
        origin = tags.get(versions.TAG_SOURCE_VERSION)
        if not origin:
            raise StageError(
                f"{name} v{version.version} is compressed ({tags[versions.TAG_QUANTIZATION]}) "
                "and names no float source version to continue from"
            )
        version = versions.resolve(uri, f"{name}/{origin}")
    return version


def retrain_config(
    cfg: ExperimentConfig, data: str, init_from: Path, workdir: Path
) -> ExperimentConfig:
    """The experiment with the new data, its own output folder and the old weights."""
    raw = cfg.model_dump(mode="json")
    raw["data"]["path"] = data
    raw["data"]["hf"] = None
    raw["data"]["split"]["files"] = {}  # the old experiment's own held-out files do not apply
    raw["model"]["init_from"] = str(init_from)
    raw["model"]["random_init"] = False
    raw["output_dir"] = str(workdir)
    raw["cluster"]["storage_path"] = str(workdir) if cfg.cluster.storage_path else None
    raw["tune"]["enabled"] = False  # one continued run with the experiment's values
    # The registry and MLflow experiment stay the experiment's own.
    raw["tracking"]["experiment_name"] = cfg.experiment_name
    raw["tracking"]["registered_model_name"] = cfg.registered_model_name
    return validate_experiment(raw, source=f"{cfg.name} retrain")


def write_replay(
    old_cfg: ExperimentConfig, labels: list[str], fraction: float, folder: Path, seed: int
) -> int:
    """A seeded ``fraction`` of the experiment's old training split, as tokenized rows.

    The row numbers are drawn from the files' metadata; each row group is read only if it
    holds a drawn row, and only its drawn rows are kept: the driver never holds the split.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lepton_ray.data.preprocess import load_manifest
    from lepton_ray.data.split_files import open_split
    from lepton_ray.train.driver import token_columns

    columns = token_columns(old_cfg.task)
    train = open_split(old_cfg, "train", columns)
    if train is None:
        raise StageError(
            f"--replay: the experiment's training split in {old_cfg.data_dir} is empty"
        )
    old_labels = list(load_manifest(old_cfg)["labels"])
    if old_labels != list(labels):
        raise StageError(
            f"--replay: the old training split's labels {old_labels} differ from the new "
            f"data's {list(labels)}"
        )
    rows = int(round(fraction * len(train)))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    schema = pq.read_schema(train.files[0])
    schema = pa.schema([schema.field(c) for c in columns])
    with pq.ParquetWriter(folder / "replay.parquet", schema) as writer:
        for table in train.sample_tables(rows, seed):
            writer.write_table(table.select(columns))
    (folder / "replay.json").write_text(json.dumps({"rows": rows, "fraction": fraction}))
    return rows


def trained_on_folders(cfg: ExperimentConfig, source, log=print) -> list[Path]:
    """The preprocessed training folders whose texts ``source`` has seen: the experiment's
    training split and those its tags name (earlier retrains), where they still exist."""
    named = [cfg.data_dir / "train"]
    named += [Path(p) for p in (source.tags or {}).get(TAG_TRAINED_ON, "").splitlines() if p]
    folders = []
    for folder in dict.fromkeys(named):
        if folder.is_dir():
            folders.append(folder)
        else:
            log(f"[retrain] warning: {folder} is gone; its texts cannot be kept out of evaluation")
    return folders


def prepare_retrain_data(
    cfg: ExperimentConfig,
    new_cfg: ExperimentConfig,
    source,
    replay: float,
    log=print,
) -> tuple[dict[str, Any], Path | None, int, list[Path]]:
    """Preprocess the new data, its evaluation splits free of texts ``source`` trained on,
    and write the replay sample. Returns (manifest, replay folder, replay rows, the
    training folders checked)."""
    from lepton_ray.data.preprocess import run_preprocess

    if not cfg.data_dir.joinpath("train").exists():
        run_preprocess(cfg, log=log)  # the experiment's training texts, to check against
    trained_on = trained_on_folders(cfg, source, log)
    manifest = run_preprocess(new_cfg, log=log, trained_on=trained_on)
    seen = manifest.get("seen_in_training", {})
    log(
        f"[retrain] removed {sum(seen.values())} rows of the new evaluation splits whose text "
        f"v{source.version} trained on ("
        + ", ".join(f"{split} {n}" for split, n in seen.items())
        + ")"
    )
    replay_dir, replay_rows = None, 0
    if replay > 0:
        # Drawn from the experiment's training split, one of the folders checked above: no
        # replayed text is in the new evaluation splits.
        replay_dir = new_cfg.storage_root / "replay"
        replay_rows = write_replay(cfg, manifest["labels"], replay, replay_dir, cfg.train.seed)
        log(f"[retrain] replaying {replay_rows} rows of the old training split")
    return manifest, replay_dir, replay_rows, trained_on


def run_retrain(
    cfg: ExperimentConfig,
    data: str,
    source_spec: str | None = None,
    replay: float = 0.0,
    log=print,
    swap: bool = True,
) -> dict[str, Any]:
    """Continue fine-tuning ``source_spec`` (default ``NAME@champion``) on ``data``."""
    from lepton_ray.pipeline import _connect, register_trained, run_compress_stage, settle
    from lepton_ray.registry import versions
    from lepton_ray.tracking.mlflow import (
        TAG_STAGE,
        download_model,
        lineage_tags,
        log_config,
        set_tags,
        tracked_run,
    )
    from lepton_ray.train.driver import run_train

    if not 0.0 <= replay <= 1.0:
        raise ConfigError(f"--replay {replay:g}: give a fraction of the old training rows, 0 to 1")
    if isinstance(cfg.storage_root, Uri):
        # The model to continue from is downloaded into a folder under the storage root
        # that the workers load by path, and the replay sample is written with file APIs.
        raise ConfigError(
            f"retrain does not support an object-store cluster.storage_path "
            f"({cfg.storage_root}) yet; give a folder every node mounts for the retrain, "
            "e.g. --set cluster.storage_path=/shared/folder"
        )
    import glob

    if not Path(data).exists() and not glob.glob(data):
        raise ConfigError(f"--data {data}: no such file")
    started = time.time()
    uri, name = cfg.tracking.tracking_uri, cfg.registered_model_name
    spec = source_spec or f"{name}@{versions.CHAMPION}"
    source = _trainable_source(uri, spec, name)
    key = hashlib.sha256(f"{data}:{replay}:{source.version}".encode()).hexdigest()[:10]
    # Under the shared storage root: the replay rows and the new shards are read by workers.
    workdir = cfg.storage_root / cfg.name / "retrain" / f"v{source.version}-{key}"
    init_from = download_model(uri, f"models:/{name}/{source.version}", workdir / "from")
    new_cfg = retrain_config(cfg, data, init_from, workdir)
    log(f"[retrain] continuing {name} v{source.version} ({spec}) on {data}")

    _connect(new_cfg, log)
    if swap:  # a Serve address the cluster cannot honour fails now, not after training
        from lepton_ray.serve.client import check_proxy_address

        check_proxy_address(cfg.serve.host, cfg.serve.port)
    manifest, replay_dir, replay_rows, trained_on = prepare_retrain_data(
        cfg, new_cfg, source, replay, log
    )
    lineage = {
        TAG_RETRAINED_FROM: f"models:/{name}/{source.version}",
        TAG_RETRAIN_DATA: str(data),
        TAG_REPLAY_ROWS: str(replay_rows),
        TAG_TRAINED_ON: "\n".join(map(str, [*trained_on, new_cfg.data_dir / "train"])),
    }
    tags = lineage_tags(new_cfg, manifest["fingerprint"], **{TAG_STAGE: "retrain"}, **lineage)
    summary: dict[str, Any] = {"source_version": str(source.version), "replay_rows": replay_rows}
    with tracked_run(new_cfg, "retrain", tags=tags) as parent:
        log_config(uri, parent, new_cfg)
        from lepton_ray.pipeline import log_data_report

        log_data_report(new_cfg, parent, manifest)
        best = run_train(
            new_cfg, manifest, parent_run_id=parent, log=log, new=True, replay=replay_dir
        )
        trained = register_trained(new_cfg, best, manifest, log, extra=lineage)
        summary["best"] = {**best, "version": trained.version}
        candidate = str(trained.version)
        if new_cfg.compress.enabled:
            compressed = run_compress_stage(
                new_cfg,
                model_uri=f"models:/{name}/{trained.version}",
                parent_run_id=parent,
                log=log,
                promote=False,
            )
            summary["compress"] = compressed
            candidate = compressed["version"]
        # Champion and challenger on one held-out split: the new data's validation split.
        summary["promoted"] = settle(new_cfg, candidate, log)
        summary["candidate_version"] = candidate
        summary["parent_run_id"] = parent
        set_tags(
            uri,
            parent,
            {"lepton.candidate_version": candidate, "lepton.promoted": summary["promoted"]},
        )
    if swap and summary["promoted"]:
        summary["serve"] = _swap_endpoint(cfg, log)
    summary["seconds"] = round(time.time() - started, 1)
    return summary


def _swap_endpoint(cfg: ExperimentConfig, log) -> dict[str, Any] | None:
    """Point the experiment's running endpoint at the new champion (in place)."""
    from lepton_ray.pipeline import serving_model_uri
    from lepton_ray.runtime.cluster import serve_applications
    from lepton_ray.serve.client import deploy

    app_name = cfg.serve.app_name or cfg.name
    if app_name not in serve_applications():
        log(
            f"[serve] no application '{app_name}' running; serve the champion with lepton-ray serve"
        )
        return None
    url, pinned = deploy(cfg, serving_model_uri(cfg), log=log)
    return {"url": url, "model_uri": pinned}
