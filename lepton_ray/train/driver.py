"""``run_train``: one Ray Train run (TorchTrainer; DDP or FSDP) tracked as an MLflow run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import LeptonError
from lepton_ray.train.distill import pin_teacher
from lepton_ray.train.worker import ray_storage, train_fn_per_worker


class TrainingFailed(LeptonError):
    """Training crashed on a worker; the message carries the worker's error."""

    exit_code = 1


def token_columns(task: str) -> list[str]:
    """The columns of a tokenized split that training reads (the task's target among them)."""
    from lepton_ray.tasks import get_task

    targets = get_task(task).stored_targets()
    return ["text", *([targets] if isinstance(targets, str) else targets), "input_ids"]


"""The columns of a preprocessed split that training reads (and a replay folder holds)."""


def load_split_dataset(
    cfg: ExperimentConfig, split: str, block_rows: int = 4096, extra: Path | None = None
):
    """A tokenized split, materialized in the object store in a fixed block order.

    Workers receive their rows from here (no shared filesystem needed) and shuffle them
    themselves, seeded per epoch (``batching.epoch_batches``). The block order is fixed
    (``preserve_order``) and the streaming split is deterministic, so every run with the
    same seed, and every restart of a failed worker, gives each worker the same rows.

    Materializing before the trainer starts matters on small machines: a lazy read would
    wait forever for a CPU while the workers hold them all.
    """
    import ray.data

    from lepton_ray.runtime.uri import location, open_parquet, parquet_files, resolve
    from lepton_ray.train.recipe import split_folder

    folders = [split_folder(cfg, split)] + ([location(extra)] if extra is not None else [])
    # Only *.parquet files, as read_parquet takes them (a replay folder holds a JSON too).
    files = [f for folder in folders for f in parquet_files(folder)]
    # The row count comes from the Parquet footers: asking Ray Data for it ran the whole read
    # once more, a few seconds of every run's start-up.
    rows = sum(open_parquet(f).metadata.num_rows for f in files)
    # One filesystem for every file: the storage root's (a replay folder is under it too).
    fs, _ = resolve(folders[0])
    paths = [resolve(f)[1] for f in files]
    options = ray.data.DataContext.get_current().execution_options
    previous, options.preserve_order = options.preserve_order, True
    try:
        ds = ray.data.read_parquet(paths, columns=token_columns(cfg.task), filesystem=fs)
        blocks = max(1, min(MAX_BLOCKS, -(-rows // block_rows)))
        return ds.repartition(blocks).materialize()
    finally:
        options.preserve_order = previous  # other stages of this process keep theirs


MAX_BLOCKS = 256


def check_worker_resources(cfg: ExperimentConfig, what: str) -> None:
    """Stop at once, with the reason, if the cluster cannot host the workers now."""
    from lepton_ray.runtime.cluster import check_resources

    per_worker = cfg.scaling.resources_per_worker
    n = cfg.scaling.num_workers
    gpus = per_worker.get("GPU", 1.0 if cfg.scaling.use_gpu else 0.0)
    check_resources(cfg.cluster, n * per_worker.get("CPU", 1.0), n * gpus, f"{what} ({n} workers)")


def preflight(cfg: ExperimentConfig, manifest: dict[str, Any], what: str = "training") -> None:
    """Every check that can fail before a worker starts: resources, GPUs, FSDP, resume, the
    distillation teacher."""
    from lepton_ray.errors import StageError

    if cfg.scaling.use_gpu:
        import ray

        if ray.cluster_resources().get("GPU", 0) <= 0:
            raise StageError(
                "scaling.use_gpu is true but the Ray cluster has no GPU; "
                "set scaling.use_gpu: false to train on CPUs"
            )
    check_worker_resources(cfg, what)
    if cfg.train.resume_from:
        from lepton_ray.train.checkpoint import check_checkpoint

        check_checkpoint(cfg.train.resume_from)
    if cfg.train.distill is not None:  # the teacher's task, labels and vocabulary
        from lepton_ray.train.distill import check_teacher

        check_teacher(cfg, manifest["labels"])
    # The model is built once here: a typo in peft.lora.target_modules, a config override
    # the architecture refuses or a model too small for FSDP stops the run now, not in
    # every worker (and again in every retry).
    from lepton_ray.train.recipe import build_peft_model

    try:
        model = build_peft_model(cfg, manifest["labels"])
    except (ValueError, KeyError, TypeError) as err:
        raise StageError(f"model {cfg.model.name} with peft {cfg.peft.method}: {err}") from None
    if cfg.train.strategy == "fsdp":
        from lepton_ray.train.parallel import check_fsdp

        check_fsdp(model, cfg.scaling.num_workers, cfg.train.fsdp_min_params_per_worker)


def build_trainer(
    cfg: ExperimentConfig,
    manifest: dict[str, Any],
    mlflow_run_id: str | None,
    name: str,
    callbacks: list | None = None,
    datasets: dict | None = None,
):
    """A ``TorchTrainer`` over the preprocessed splits (Ray Data shards train per worker)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    if datasets is None:
        preflight(cfg, manifest)
        cfg = pin_teacher(cfg)
        datasets = {split: load_split_dataset(cfg, split) for split in ("train", "validation")}
    storage_path, storage_filesystem = ray_storage(cfg)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "manifest": manifest,
            "mlflow_run_id": mlflow_run_id,
            "resume_from": cfg.train.resume_from,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=dict(cfg.scaling.resources_per_worker),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.tune.metric,
                checkpoint_score_order=cfg.tune.mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"],
            execution_options=ExecutionOptions(preserve_order=True),
            enable_shard_locality=False,
        ),
    )


def fit(trainer) -> Any:
    """``trainer.fit()`` with a worker's crash turned into one readable line."""
    import signal
    import threading

    from ray.train import TrainingFailedError

    # In the main thread, fit() installs a SIGINT handler whose closure holds the train
    # controller's actor handle; left in place it keeps a failed run's controller and its
    # workers' placement group (every CPU) alive until the process exits.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except TrainingFailedError as err:
        raise TrainingFailed(f"training failed: {_worker_error(err)}") from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def training_key(cfg: ExperimentConfig, manifest: dict[str, Any]) -> str:
    """Same data and the same training settings -> the same key (and Ray run name)."""
    import hashlib
    import json

    sections = {k: cfg.model_dump(mode="json")[k] for k in TRAINING_SECTIONS}
    sections["data_fingerprint"] = manifest.get("fingerprint")
    blob = json.dumps(sections, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


TRAINING_SECTIONS = ("name", "task", "model", "peft", "train", "scaling")
TAG_TRAINING_KEY = "lepton.training_key"
TAG_RAY_RUN = "lepton.ray_run_name"


RESUMABLE_STATUSES = ("RUNNING", "KILLED")
"""Runs that were interrupted: a driver that died without closing its run leaves it RUNNING,
a signal ends it KILLED. A FAILED run stopped on an error of its own, which resuming from
its checkpoint would most likely meet again, so the next command starts a new run."""


def unfinished_run(cfg: ExperimentConfig, key: str, log=print) -> str | None:
    """The latest MLflow train run with this key, if it was interrupted (to resume it)."""
    from lepton_ray.tracking.mlflow import TAG_ERROR, experiment_runs

    runs = experiment_runs(cfg, f"tags.`{TAG_TRAINING_KEY}` = '{key}'", max_results=1)
    # Only the latest counts: once a run with this key finished, the next one starts afresh.
    if not runs:
        return None
    latest = runs[0]
    if latest.info.status in RESUMABLE_STATUSES:
        return latest.info.run_id
    if latest.info.status == "FAILED":
        error = latest.data.tags.get(TAG_ERROR) or "no error recorded"
        log(
            f"[train] the latest run with these settings, {latest.info.run_id}, FAILED "
            f"({error[:200]}); it is not resumed: starting a new run"
        )
    return None


def run_train(
    cfg: ExperimentConfig,
    manifest: dict[str, Any],
    parent_run_id: str | None = None,
    log=print,
    new: bool = False,
    replay: Path | None = None,
) -> dict[str, Any]:
    """Train once with the config's hyperparameters; returns the MLflow run id and metrics.

    ``replay``: a folder of tokenized rows (``driver.token_columns``) trained on
    beside the train split (``lepton-ray retrain`` mixes in old training rows this way).

    Re-running the same command after a crash (or a killed driver) resumes: the MLflow run
    that did not finish is reopened, and its Ray Train run name (stable: training key +
    MLflow run id) makes Ray Train restore the latest checkpoint from ``storage_path``.
    ``new=True`` starts afresh.
    """
    from lepton_ray.tracking.mlflow import TAG_STAGE, lineage_tags, log_config, tracked_run

    preflight(cfg, manifest)
    cfg = pin_teacher(cfg, log)
    datasets = {
        "train": load_split_dataset(cfg, "train", extra=replay),
        "validation": load_split_dataset(cfg, "validation"),
    }
    # Replayed rows are training data too: they make another key.
    keyed = (
        manifest
        if replay is None
        else {**manifest, "fingerprint": f"{manifest.get('fingerprint')}+{replay}"}
    )
    key = training_key(cfg, keyed)
    resume = None if new else unfinished_run(cfg, key, log)
    tags = lineage_tags(
        cfg, manifest.get("fingerprint"), **{TAG_STAGE: "train", TAG_TRAINING_KEY: key}
    )
    with tracked_run(
        cfg, "train", tags=tags, parent_run_id=parent_run_id, resume_run_id=resume
    ) as run_id:
        name = f"{cfg.name}-train-{key[:8]}-{run_id[:8]}"
        if resume:
            log(
                f"[train] resuming run {run_id} ({name}) from its latest checkpoint; --new starts afresh"
            )
        else:
            log_config(cfg.tracking.tracking_uri, run_id, cfg)
        from lepton_ray.tracking.mlflow import set_tags

        set_tags(cfg.tracking.tracking_uri, run_id, {TAG_RAY_RUN: name})
        log(
            f"[train] {cfg.scaling.num_workers} workers ({cfg.train.strategy}) x "
            f"{cfg.train.epochs} epochs, {datasets['train'].count()} training rows, "
            f"peft={cfg.peft.method}"
        )
        result = fit(build_trainer(cfg, manifest, run_id, name=name, datasets=datasets))
    best = _best_metrics(result, cfg)
    return {"run_id": run_id, "metrics": best, "checkpoint": result.checkpoint}


def _best_metrics(result, cfg: ExperimentConfig) -> dict[str, Any]:
    pairs = getattr(result, "best_checkpoints", None) or []
    if not pairs:
        return dict(result.metrics or {})
    pick = max if cfg.tune.mode == "max" else min
    _, metrics = pick(pairs, key=lambda pair: pair[1][cfg.tune.metric])
    return dict(metrics)


_EXCEPTION_LINE = re.compile(r"^(?:ray::\S+\s+)?[A-Za-z_][\w.]*(?:Error|Exception)\b.*?:")


def _worker_error(err: BaseException) -> str:
    """The worker's own exception, on one line: the last ``SomeError: ...`` and what follows."""
    lines = [line.strip() for line in str(err).splitlines()]
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    if not starts:
        return (lines[0] if lines else type(err).__name__)[:500]
    message = " ".join(line for line in lines[starts[-1] :] if line)
    return message[:500]
