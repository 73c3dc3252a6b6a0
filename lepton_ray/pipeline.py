"""The stages in order, and the small glue that registers what each stage produced.

Every CLI command and notebook calls one of the ``run_*`` functions here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig

ALIAS_TRAINED = "champion"
ALIAS_SERVING = "serving"


def _connect(cfg: ExperimentConfig, log) -> str:
    from lepton_ray.runtime import init_ray

    return init_ray(cfg.cluster, log=log)


def _data(cfg: ExperimentConfig) -> dict[str, Any]:
    from lepton_ray.data.pipeline import load_manifest

    return load_manifest(cfg)


TAG_SOURCE_VERSION = "lepton.source_version"
"""On a compressed version: the registered version it was made from."""


def register_trained(cfg: ExperimentConfig, run_id: str, manifest: dict[str, Any], log=print):
    """Register the best run's ``model`` artifact and point the 'champion' alias at it.

    An ``@serving`` alias left on a compression of an older champion is removed: it must
    never stay in front of users once a new champion exists (``compress`` sets it again).
    """
    from lepton_ray.tracking.mlflow import TAG_STAGE, lineage_tags, register_version, remove_alias

    tags = lineage_tags(
        cfg, manifest.get("fingerprint"), **{TAG_STAGE: "trained", "lepton.run_id": run_id}
    )
    version = register_version(
        cfg.tracking.tracking_uri,
        cfg.registered_model_name,
        run_id,
        "model",
        tags,
        alias=ALIAS_TRAINED,
        description=f"Best fine-tuned model of experiment {cfg.name}.",
    )
    if remove_alias(cfg.tracking.tracking_uri, cfg.registered_model_name, ALIAS_SERVING):
        log(f"[registry] removed @{ALIAS_SERVING}: it compressed an older champion")
    log(
        f"[registry] {cfg.registered_model_name} version {version.version} (@{ALIAS_TRAINED}) from run {run_id}"
    )
    return version


def run_preprocess_stage(
    cfg: ExperimentConfig, log=print, force: bool = False, track: bool = True
) -> dict[str, Any]:
    """The data stage; with ``track`` its report goes to an MLflow run 'preprocess'."""
    from lepton_ray.data.pipeline import run_preprocess

    _connect(cfg, log)
    manifest = run_preprocess(cfg, log=log, force=force)
    if track:
        from lepton_ray.tracking.mlflow import TAG_STAGE, lineage_tags, tracked_run

        tags = lineage_tags(cfg, manifest["fingerprint"], **{TAG_STAGE: "preprocess"})
        with tracked_run(cfg, "preprocess", tags=tags) as run_id:
            log_data_report(cfg, run_id, manifest)
            log(f"[mlflow] data report in run {run_id}")
    return manifest


def log_data_report(cfg: ExperimentConfig, run_id: str, manifest: dict[str, Any]) -> None:
    from lepton_ray.data.report import log_data_report as log_report

    log_report(cfg.tracking.tracking_uri, run_id, manifest, cfg.data_dir)


def run_train_stage(
    cfg: ExperimentConfig, parent_run_id: str | None = None, log=print, new: bool = False
) -> dict[str, Any]:
    """One training run with the config's values, registered as the champion."""
    from lepton_ray.train.driver import run_train

    manifest = _data(cfg)
    _connect(cfg, log)
    best = run_train(cfg, manifest, parent_run_id=parent_run_id, log=log, new=new)
    best["version"] = register_trained(cfg, best["run_id"], manifest, log).version
    return best


def run_tune_stage(
    cfg: ExperimentConfig, parent_run_id: str | None = None, log=print
) -> dict[str, Any]:
    """A sweep under a parent run (made here if not given); the best trial is registered."""
    from lepton_ray.tracking.mlflow import TAG_STAGE, lineage_tags, log_config, tracked_run
    from lepton_ray.tune.driver import run_tune

    manifest = _data(cfg)
    _connect(cfg, log)
    if parent_run_id is None:
        tags = lineage_tags(cfg, manifest.get("fingerprint"), **{TAG_STAGE: "tune"})
        with tracked_run(cfg, "tune", tags=tags) as run_id:
            log_config(cfg.tracking.tracking_uri, run_id, cfg)
            best = run_tune(cfg, manifest, run_id, log=log)
    else:
        best = run_tune(cfg, manifest, parent_run_id, log=log)
    best["version"] = register_trained(cfg, best["run_id"], manifest, log).version
    return best


def run_compress_stage(
    cfg: ExperimentConfig, model_uri: str | None = None, parent_run_id: str | None = None, log=print
) -> dict[str, Any]:
    """Compress a registered model (default: @champion) and register it as @serving."""
    from lepton_ray.compress.quantize import run_compress
    from lepton_ray.tracking.mlflow import (
        TAG_STAGE,
        download_model,
        get_model_version,
        lineage_tags,
        register_version,
        tracked_run,
    )

    manifest = _data(cfg)
    uri = cfg.tracking.tracking_uri
    source = get_model_version(
        uri, model_uri or f"models:/{cfg.registered_model_name}@{ALIAS_TRAINED}"
    )
    model_uri = f"models:/{source.name}/{source.version}"
    tags = lineage_tags(
        cfg,
        manifest.get("fingerprint"),
        **{
            TAG_STAGE: "compress",
            "lepton.source_model": model_uri,
            TAG_SOURCE_VERSION: str(source.version),
        },
    )
    with tempfile.TemporaryDirectory(prefix="lepton-compress-") as tmp:
        folder = download_model(uri, model_uri, Path(tmp))
        with tracked_run(cfg, "compress", tags=tags, parent_run_id=parent_run_id) as run_id:
            _, metrics = run_compress(cfg, folder, Path(tmp) / "out", run_id, log=log)
    version = register_version(
        uri,
        cfg.registered_model_name,
        run_id,
        "model",
        {**tags, "lepton.quantization": cfg.compress.method},
        alias=ALIAS_SERVING,
        description=f"{cfg.compress.method} of {model_uri}.",
    )
    log(
        f"[registry] {cfg.registered_model_name} version {version.version} (@{ALIAS_SERVING}) = {cfg.compress.method} of {model_uri}"
    )
    return {"run_id": run_id, "metrics": metrics, "version": version.version}


def serving_model_uri(cfg: ExperimentConfig) -> str:
    """What to serve by default, as a pinned ``models:/NAME/VERSION``.

    ``@serving`` when it is a compression of the current ``@champion``, else ``@champion``:
    a newer champion that was not compressed is never hidden behind an older @serving (a
    registry written before that rule may still hold one).
    """
    from lepton_ray.tracking.mlflow import get_model_version, get_version_by_alias

    uri, name = cfg.tracking.tracking_uri, cfg.registered_model_name
    champion = get_model_version(uri, f"models:/{name}@{ALIAS_TRAINED}")
    serving = get_version_by_alias(uri, name, ALIAS_SERVING)
    if serving is not None and serving.tags.get(TAG_SOURCE_VERSION) == str(champion.version):
        return f"models:/{name}/{serving.version}"
    return f"models:/{name}/{champion.version}"


def run_serve_stage(
    cfg: ExperimentConfig, model_uri: str | None = None, log=print
) -> dict[str, Any]:
    """Deploy on Ray Serve and send the config's example texts; returns the URL and answers.

    ``model_uri`` (an alias or a version) is pinned to its version number at deploy time.
    """
    from lepton_ray.serve.client import deploy, predict
    from lepton_ray.tracking.mlflow import get_model_version

    model_uri = model_uri or serving_model_uri(cfg)
    get_model_version(cfg.tracking.tracking_uri, model_uri)  # fail here, clearly, if it is missing
    mode = _connect(cfg, log)
    url, pinned = deploy(cfg, model_uri, log=log)
    answers = predict(url, cfg.serve.example_texts) if cfg.serve.example_texts else []
    return {"url": url, "model_uri": pinned, "answers": answers, "ray": mode}


def run_serve_stop(cfg: ExperimentConfig, log=print) -> bool:
    from lepton_ray.serve.client import undeploy

    _connect(cfg, log)
    return undeploy(cfg, log=log)


def run(cfg: ExperimentConfig, log=print, new: bool = False) -> dict[str, Any]:
    """All stages: preprocess, train or tune, register, compress, serve."""
    from lepton_ray.tracking.mlflow import (
        TAG_STAGE,
        lineage_tags,
        log_config,
        redact_uri,
        set_tags,
        tracked_run,
    )

    started = time.time()
    summary: dict[str, Any] = {}
    if cfg.serve.enabled:
        # A previous run's endpoint holds a CPU that Ray Data's shuffles and training need
        # (with one CPU left the data stage crawls); it is redeployed at the end.
        from lepton_ray.serve.client import undeploy

        _connect(cfg, log)
        undeploy(cfg, log=log)
    manifest = run_preprocess_stage(cfg, log=log, track=False)
    tags = lineage_tags(cfg, manifest["fingerprint"], **{TAG_STAGE: "pipeline"})
    uri = cfg.tracking.tracking_uri
    with tracked_run(cfg, "pipeline", tags=tags) as parent:
        log(
            f"[mlflow] parent run {parent} in experiment '{cfg.experiment_name}' "
            f"({redact_uri(uri)})"
        )
        log_config(uri, parent, cfg)
        log_data_report(cfg, parent, manifest)
        if cfg.tune.enabled:
            summary["best"] = run_tune_stage(cfg, parent_run_id=parent, log=log)
        else:
            summary["best"] = run_train_stage(cfg, parent_run_id=parent, log=log, new=new)
        if cfg.compress.enabled:
            summary["compress"] = run_compress_stage(cfg, parent_run_id=parent, log=log)
        set_tags(
            uri,
            parent,
            {
                "lepton.registered_model": cfg.registered_model_name,
                "lepton.best_run_id": summary["best"]["run_id"],
            },
        )
        summary["parent_run_id"] = parent
    if cfg.serve.enabled:
        # Exactly the version this run registered last (compressed, else trained).
        deployed = summary.get("compress", summary["best"])["version"]
        summary["serve"] = run_serve_stage(
            cfg, model_uri=f"models:/{cfg.registered_model_name}/{deployed}", log=log
        )
    summary["seconds"] = round(time.time() - started, 1)
    return summary
