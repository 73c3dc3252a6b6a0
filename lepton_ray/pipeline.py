"""The stages in order, and the small glue that registers what each stage produced.

Every CLI command and notebook calls one of the ``run_*`` functions here.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import ConfigError, StageError
from lepton_ray.registry.gate import eval_split_id, settle


def _connect(cfg: ExperimentConfig, log, storage: bool = True) -> str:
    """Connect to Ray; ``storage``: the stage reads or writes shards and checkpoints, so on a
    multi-node cluster every node must see the storage root (checked once, up front)."""
    from lepton_ray.runtime.cluster import init_ray

    if storage:
        from lepton_ray.runtime.storage import check_storage

        check_storage(cfg, log=log)  # an object store's endpoint, credentials and bucket
    mode = init_ray(cfg.cluster, log=log)
    if storage:
        from lepton_ray.runtime.storage import check_shared_storage

        check_shared_storage(cfg, log=log)
    return mode


def _data(cfg: ExperimentConfig) -> dict[str, Any]:
    from lepton_ray.data.preprocess import load_manifest
    from lepton_ray.runtime.storage import check_storage

    check_storage(cfg, log=lambda _: None)  # a bucket's problem before "no data there"
    return load_manifest(cfg)


def register_trained(
    cfg: ExperimentConfig,
    best: dict[str, Any],
    manifest: dict[str, Any],
    log=print,
    extra: dict[str, str] | None = None,
):
    """Register the best run's ``model`` artifact as a new version, marked ``@challenger``.

    ``extra``: more lineage tags for the version (a retrain names what it continued)."""
    from lepton_ray.registry import versions
    from lepton_ray.tracking.mlflow import TAG_STAGE, TAG_TRIAL_ID, client, lineage_tags

    uri, name, run_id = cfg.tracking.tracking_uri, cfg.registered_model_name, best["run_id"]
    run_tags = client(uri).get_run(run_id).data.tags
    extra = {**(extra or {}), TAG_STAGE: "trained"}
    if run_tags.get(TAG_TRIAL_ID):
        extra[TAG_TRIAL_ID] = run_tags[TAG_TRIAL_ID]
    lineage = lineage_tags(cfg, manifest.get("fingerprint"), **extra)
    candidate = versions.Candidate(
        metrics={k: v for k, v in (best.get("metrics") or {}).items() if k.startswith("val_")},
        metric_name=cfg.tune.metric,
        metric_mode=cfg.tune.mode,
        eval_split=eval_split_id(manifest),
        peft_method=cfg.peft.method,
    )
    with tempfile.TemporaryDirectory(prefix="lepton-register-") as tmp:
        artifact = versions.run_artifact(uri, run_id, "model", Path(tmp))
        version = versions.register(
            uri,
            name,
            run_id,
            artifact,
            lineage,
            candidate,
            description=f"Best fine-tuned model of experiment {cfg.name} (run {run_id}).",
            log=log,
        )
    log(f"[registry] {name} v{version.version} (@{versions.CHALLENGER}) from run {run_id}")
    return version


def run_preprocess_stage(
    cfg: ExperimentConfig, log=print, force: bool = False, track: bool = True
) -> dict[str, Any]:
    """The data stage; with ``track`` its report goes to an MLflow run 'preprocess'."""
    from lepton_ray.data.preprocess import run_preprocess

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
    cfg: ExperimentConfig,
    parent_run_id: str | None = None,
    log=print,
    new: bool = False,
    promote: bool = True,
) -> dict[str, Any]:
    """One training run with the config's values, registered (and promoted per the registry
    policy unless ``promote`` is False: the pipeline promotes after compression)."""
    from lepton_ray.train.driver import run_train

    manifest = _data(cfg)
    _connect(cfg, log)
    best = run_train(cfg, manifest, parent_run_id=parent_run_id, log=log, new=new)
    best["version"] = register_trained(cfg, best, manifest, log).version
    if promote:
        best["promoted"] = settle(cfg, best["version"], log)
    return best


def run_tune_stage(
    cfg: ExperimentConfig,
    parent_run_id: str | None = None,
    log=print,
    promote: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """A sweep under a parent run (made here if not given); the best trial is registered.

    ``resume``: reopen the latest interrupted sweep of this config (same data, training
    settings and sweep) and continue it; refused when there is none."""
    from lepton_ray.tracking.mlflow import TAG_STAGE, lineage_tags, log_config, tracked_run
    from lepton_ray.tune.driver import TAG_SWEEP_KEY, run_tune, sweep_key

    if not cfg.tune.space:
        raise ConfigError(
            "tune.space is empty: add a parameter to search (see docs/configuration.md), "
            "or use lepton-ray train"
        )
    manifest = _data(cfg)
    _connect(cfg, log)
    if parent_run_id is None:
        key = sweep_key(cfg, manifest)
        reopen = interrupted_run(cfg, "tune", key, log) if resume else None
        tags = lineage_tags(
            cfg, manifest.get("fingerprint"), **{TAG_STAGE: "tune", TAG_SWEEP_KEY: key}
        )
        with tracked_run(cfg, "tune", tags=tags, resume_run_id=reopen) as run_id:
            if reopen is None:
                log_config(cfg.tracking.tracking_uri, run_id, cfg)
            best = run_tune(cfg, manifest, run_id, log=log, resume=resume)
    else:
        best = run_tune(cfg, manifest, parent_run_id, log=log, resume=resume)
    best["version"] = register_trained(cfg, best, manifest, log).version
    if promote:
        best["promoted"] = settle(cfg, best["version"], log)
    return best


def interrupted_run(cfg: ExperimentConfig, stage: str, key: str, log=print) -> str:
    """The latest run of ``stage`` with this sweep key, if it was interrupted (RUNNING: its
    driver died; KILLED: a signal stopped it); ``--resume`` continues it."""
    from lepton_ray.tracking.mlflow import experiment_runs
    from lepton_ray.tune.driver import TAG_SWEEP_KEY

    runs = experiment_runs(
        cfg, f"tags.`lepton.stage` = '{stage}' and tags.`{TAG_SWEEP_KEY}` = '{key}'", 1
    )
    if not runs or runs[0].info.status not in ("RUNNING", "KILLED"):
        latest = f" (the latest, {runs[0].info.run_id}, is {runs[0].info.status})" if runs else ""
        raise StageError(
            f"--resume: experiment '{cfg.experiment_name}' has no interrupted {stage} run of "
            f"this config{latest}; run the command without --resume to start one"
        )
    run_id = runs[0].info.run_id
    log(f"[{stage}] resuming {stage} run {run_id}")
    return run_id


def _compressed_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A compressed version's own metrics (``val_accuracy`` = after compression), plus the
    uncompressed figures as ``*_uncompressed``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.endswith("_compressed"):
            out[key.removesuffix("_compressed")] = value
        elif key.endswith("_fp32"):
            out[key.removesuffix("_fp32") + "_uncompressed"] = value
        else:
            out[key] = value
    return out


def run_compress_stage(
    cfg: ExperimentConfig,
    model_uri: str | None = None,
    parent_run_id: str | None = None,
    log=print,
    promote: bool = True,
) -> dict[str, Any]:
    """Compress a registered version (default: the champion's uncompressed source).

    An accepted compression is registered as a new version (``@challenger``, naming its
    source); a refused one (accuracy gate) leaves the registry as it was. The candidate
    - the compressed version, else the source - then goes through the promotion policy.
    """
    from lepton_ray.compress.quantize import run_compress
    from lepton_ray.registry import versions
    from lepton_ray.tracking.mlflow import TAG_STAGE, download_model, lineage_tags, tracked_run

    manifest = _data(cfg)
    uri, name = cfg.tracking.tracking_uri, cfg.registered_model_name
    source = versions.resolve(uri, model_uri or f"{name}@{versions.CHAMPION}")
    tags = source.tags or {}
    if tags.get(versions.TAG_QUANTIZATION, "none") != "none":
        origin = tags.get(versions.TAG_SOURCE_VERSION)
        if model_uri is not None or not origin:
            raise StageError(
                f"{name} v{source.version} is already compressed "
                f"({tags[versions.TAG_QUANTIZATION]}); compress its source version instead"
            )
        source = versions.resolve(uri, f"{name}/{origin}")
    source_uri = f"models:/{name}/{source.version}"
    lineage = lineage_tags(
        cfg,
        manifest.get("fingerprint"),
        **{TAG_STAGE: "compress", "lepton.source_model": source_uri},
    )
    with tempfile.TemporaryDirectory(prefix="lepton-compress-") as tmp:
        folder = download_model(uri, source_uri, Path(tmp) / "source")
        with tracked_run(cfg, "compress", tags=lineage, parent_run_id=parent_run_id) as run_id:
            result = run_compress(cfg, folder, Path(tmp) / "out", run_id, log=log)
            version = None
            if result.accepted and result.folder is not None:
                candidate = versions.Candidate(
                    metrics=_compressed_metrics(result.metrics),
                    metric_name=cfg.tune.metric,
                    metric_mode=cfg.tune.mode,
                    eval_split=eval_split_id(manifest),
                    peft_method=(source.tags or {}).get(versions.TAG_PEFT, cfg.peft.method),
                    quantization=result.method,
                    source_version=str(source.version),
                    extra_tags={
                        k: v for k, v in tags.items() if k in ("lepton.trial_id", "lepton.run_id")
                    }
                    | {"lepton.source_run_id": source.run_id or ""},
                )
                version = versions.register(
                    uri,
                    name,
                    run_id,
                    result.folder,
                    lineage,
                    candidate,
                    description=f"{result.method} of {source_uri}.",
                    log=log,
                ).version
    if version is not None:
        log(
            f"[registry] {name} v{version} (@{versions.CHALLENGER}) = {result.method} of v{source.version}"
        )
    else:
        log(f"[compress] not registered: {result.reason}; v{source.version} stays uncompressed")
    candidate_version = str(version or source.version)
    promoted = settle(cfg, candidate_version, log) if promote else False
    return {
        "run_id": run_id,
        "metrics": result.metrics,
        "method": result.method,
        "accepted": result.accepted,
        "reason": result.reason,
        "version": candidate_version,
        "compressed_version": version,
        "promoted": promoted,
    }


def serving_model_uri(cfg: ExperimentConfig) -> str:
    """What to serve by default: ``@champion``, pinned as ``models:/NAME/VERSION``."""
    from lepton_ray.registry import versions

    champion = versions.resolve(
        cfg.tracking.tracking_uri, f"{cfg.registered_model_name}@{versions.CHAMPION}"
    )
    return f"models:/{champion.name}/{champion.version}"


def run_serve_stage(
    cfg: ExperimentConfig, model_uri: str | None = None, log=print
) -> dict[str, Any]:
    """Deploy on Ray Serve and send the config's example texts; returns the URL and answers.

    ``model_uri`` (an alias or a version) is pinned to its version number at deploy time.
    """
    from lepton_ray.serve.client import api_key, chat, deploy, generates, predict
    from lepton_ray.tracking.mlflow import get_model_version

    key = api_key(cfg)  # fail here, clearly, if the variable it names is not set
    model_uri = model_uri or serving_model_uri(cfg)
    get_model_version(cfg.tracking.tracking_uri, model_uri)  # fail here, clearly, if it is missing
    mode = _connect(cfg, log, storage=False)  # replicas load from the tracking server
    url, pinned = deploy(cfg, model_uri, log=log)
    ask = chat if generates(cfg) else predict
    answers = ask(url, cfg.serve.example_texts, key=key) if cfg.serve.example_texts else []
    return {"url": url, "model_uri": pinned, "answers": answers, "ray": mode}


def run_serve_stop(cfg: ExperimentConfig, log=print) -> bool:
    from lepton_ray.serve.client import undeploy

    _connect(cfg, log, storage=False)
    return undeploy(cfg, log=log)


def run(
    cfg: ExperimentConfig, log=print, new: bool = False, resume: bool = False
) -> dict[str, Any]:
    """All stages: preprocess, train or tune, register, compress, serve. ``resume``: reopen
    the latest interrupted pipeline run of this config and continue its sweep."""
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
        # (with one CPU left the data stage crawls); it is redeployed at the end. A Serve
        # address that cannot be honoured fails now, not after training.
        from lepton_ray.serve.client import check_proxy_address, undeploy

        _connect(cfg, log)
        check_proxy_address(cfg.serve.host, cfg.serve.port)
        undeploy(cfg, log=log)
    manifest = run_preprocess_stage(cfg, log=log, track=False)
    tags = lineage_tags(cfg, manifest["fingerprint"], **{TAG_STAGE: "pipeline"})
    reopen = None
    if cfg.tune.enabled:
        from lepton_ray.tune.driver import TAG_SWEEP_KEY, sweep_key

        tags[TAG_SWEEP_KEY] = sweep_key(cfg, manifest)
        if resume:
            reopen = interrupted_run(cfg, "pipeline", tags[TAG_SWEEP_KEY], log)
    uri = cfg.tracking.tracking_uri
    with tracked_run(cfg, "pipeline", tags=tags, resume_run_id=reopen) as parent:
        log(
            f"[mlflow] parent run {parent} in experiment '{cfg.experiment_name}' "
            f"({redact_uri(uri)})"
        )
        if reopen is None:
            log_config(uri, parent, cfg)
            log_data_report(cfg, parent, manifest)
        # The trained version is promoted after compression (the served form is gated).
        promote_now = not cfg.compress.enabled
        if cfg.tune.enabled:
            summary["best"] = run_tune_stage(
                cfg, parent_run_id=parent, log=log, promote=promote_now, resume=reopen is not None
            )
        else:
            summary["best"] = run_train_stage(
                cfg, parent_run_id=parent, log=log, new=new, promote=promote_now
            )
        if cfg.compress.enabled:
            summary["compress"] = run_compress_stage(
                cfg,
                model_uri=f"models:/{cfg.registered_model_name}/{summary['best']['version']}",
                parent_run_id=parent,
                log=log,
            )
        candidate = summary.get("compress", summary["best"])
        summary["candidate_version"] = candidate["version"]
        summary["promoted"] = candidate.get("promoted", False)
        set_tags(
            uri,
            parent,
            {
                "lepton.registered_model": cfg.registered_model_name,
                "lepton.best_run_id": summary["best"]["run_id"],
                "lepton.candidate_version": candidate["version"],
                "lepton.promoted": summary["promoted"],
            },
        )
        summary["parent_run_id"] = parent
    if cfg.serve.enabled:
        # The champion, pinned: this run's candidate if the gate let it through.
        summary["serve"] = run_serve_stage(cfg, log=log)
    summary["seconds"] = round(time.time() - started, 1)
    return summary
