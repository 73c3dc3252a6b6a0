"""``run_train``: one Ray Train (TorchTrainer, DDP) run tracked as an MLflow run."""

from __future__ import annotations

import re
from typing import Any

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import LeptonError
from lepton_ray.train.worker import ray_storage, train_fn_per_worker


class TrainingFailed(LeptonError):
    """Training crashed on a worker; the message carries the worker's error."""

    exit_code = 1


def load_train_dataset(cfg: ExperimentConfig):
    """The tokenized train split, materialized in the object store, in shuffled blocks.

    Preprocessing wrote the rows in a seeded hash order, so every block mixes the classes;
    here the split is cut into blocks of a few batches whose order is reshuffled, seeded,
    at every execution (every epoch), and each worker's local shuffle buffer mixes rows
    across neighbouring blocks. That is a seeded global shuffle per epoch without an
    all-to-all shuffle task, which could not get a CPU while the workers hold them all.

    Materializing before the trainer starts matters on small machines for the same reason:
    a lazy read would wait forever for a CPU of its own.
    """
    import ray.data
    from ray.data import RandomSeedConfig

    ds = ray.data.read_parquet(str(cfg.data_dir / "train"))
    rows_per_block = SHUFFLE_BLOCK_BATCHES * cfg.train.batch_size
    num_blocks = max(1, min(MAX_SHUFFLE_BLOCKS, -(-ds.count() // rows_per_block)))
    return (
        ds.repartition(num_blocks)
        .materialize()
        .randomize_block_order(
            seed=RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
        )
    )


SHUFFLE_BLOCK_BATCHES = 4
"""Rows per shuffled block of the train split, in batches."""
MAX_SHUFFLE_BLOCKS = 512


def check_worker_resources(cfg: ExperimentConfig, what: str) -> None:
    """Stop at once, with the reason, if the cluster cannot host the workers now."""
    from lepton_ray.runtime import check_resources

    per_worker = cfg.scaling.resources_per_worker
    n = cfg.scaling.num_workers
    gpus = per_worker.get("GPU", 1.0 if cfg.scaling.use_gpu else 0.0)
    check_resources(cfg.cluster, n * per_worker.get("CPU", 1.0), n * gpus, f"{what} ({n} workers)")


def build_trainer(
    cfg: ExperimentConfig,
    manifest: dict[str, Any],
    mlflow_run_id: str | None,
    name: str,
    callbacks: list | None = None,
    train_ds=None,
):
    """A ``TorchTrainer`` over the preprocessed train split (Ray Data shards it per worker)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if train_ds is None:
        check_worker_resources(cfg, "training")
        train_ds = load_train_dataset(cfg)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "manifest": manifest,
            "mlflow_run_id": mlflow_run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=dict(cfg.scaling.resources_per_worker),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=ray_storage(cfg),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.tune.metric,
                checkpoint_score_order=cfg.tune.mode,
            ),
            callbacks=callbacks,
        ),
        datasets={"train": train_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
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


def run_train(
    cfg: ExperimentConfig,
    manifest: dict[str, Any],
    parent_run_id: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Train once with the config's hyperparameters; returns the MLflow run id and metrics."""
    from lepton_ray.tracking.mlflow import TAG_STAGE, lineage_tags, log_config, tracked_run

    tags = lineage_tags(cfg, manifest.get("fingerprint"), **{TAG_STAGE: "train"})
    with tracked_run(cfg, "train", tags=tags, parent_run_id=parent_run_id) as run_id:
        log_config(cfg.tracking.tracking_uri, run_id, cfg)
        log(
            f"[train] {cfg.scaling.num_workers} workers x {cfg.train.epochs} epochs, "
            f"{manifest['splits']['train']} training rows, peft={cfg.peft.method}"
        )
        result = fit(build_trainer(cfg, manifest, run_id, name=f"{cfg.name}-train-{run_id[:8]}"))
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
