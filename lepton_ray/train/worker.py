"""The Ray Train worker: wraps the pure-torch recipe with Ray's data, DDP and reporting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``loop_config`` is built by ``driver.build_trainer``."""
    import ray.train
    import ray.train.torch
    import torch

    from lepton_ray.evaluation import collate
    from lepton_ray.train.recipe import setup_recipe, train_recipe

    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    manifest = loop_config["manifest"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.torch_threads or max(1, int(cfg.scaling.resources_per_worker.get("CPU", 1)))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    recipe = setup_recipe(cfg, manifest, world, wrap=ray.train.torch.prepare_model)
    pad_id = recipe.tokenizer.pad_token_id or 0
    shard = ray.train.get_dataset_shard("train")

    def train_batches(epoch: int):
        for frame in iter_train_frames(shard, cfg, epoch, rank):
            yield collate(list(frame["input_ids"]), list(frame["label_id"]), pad_id)

    tracker = _RankZeroTracker(cfg, loop_config.get("mlflow_run_id"), recipe) if rank == 0 else None

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        scalar = {k: v for k, v in metrics.items() if k != "confusion"}
        if tracker is not None:
            tracker.on_epoch(metrics, folder)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(scalar, checkpoint=checkpoint)

    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as resume_dir:
            train_recipe(recipe, train_batches, device, rank, world, report, Path(resume_dir))
    else:
        train_recipe(recipe, train_batches, device, rank, world, report)


def iter_train_frames(shard, cfg: ExperimentConfig, epoch: int, rank: int):
    """One epoch of training batches (pandas frames) from a worker's dataset shard.

    The shard's blocks arrive in a per-epoch seeded order (``driver.load_train_dataset``);
    the local buffer, seeded per epoch and rank, mixes rows across several blocks.
    """
    batch = cfg.train.batch_size
    return shard.iter_batches(
        batch_size=batch,
        batch_format="pandas",
        local_shuffle_buffer_size=max(8 * batch, 512),
        local_shuffle_seed=cfg.train.seed * 1000 + epoch * 10 + rank,
    )


class _RankZeroTracker:
    """MLflow logging from rank 0 only: metrics per epoch, the best model, the pictures."""

    def __init__(self, cfg: ExperimentConfig, run_id: str | None, recipe):
        self.cfg = cfg
        self.run_id = run_id
        self.uri = cfg.tracking.tracking_uri
        self.labels = recipe.labels
        self.history: list[dict[str, Any]] = []
        if run_id:
            from lepton_ray.tracking.mlflow import log_metrics

            log_metrics(self.uri, run_id, recipe.counts, step=0)

    def on_epoch(self, metrics: dict[str, Any], folder: Path | None) -> None:
        """Log the epoch: metrics, and the pictures as they stand now.

        Plots go out with every report, not at the end: Tune's scheduler may stop a trial
        right after any report, and its workers with it.
        """
        if not self.run_id:
            return
        from lepton_ray.tracking import plots
        from lepton_ray.tracking.mlflow import log_figure, log_folder, log_metrics

        epoch = int(metrics["epoch"])
        scalars = {k: v for k, v in metrics.items() if k not in ("epoch", "confusion")}
        log_metrics(self.uri, self.run_id, scalars, epoch)
        self.history.append(
            {"epoch": epoch, **{k: v for k, v in scalars.items() if k != "improved"}}
        )
        log_figure(
            self.uri, self.run_id, plots.learning_curves(self.history), "plots/learning_curves.png"
        )
        if metrics["improved"] and folder is not None:
            metric = self.cfg.tune.metric
            log_folder(self.uri, self.run_id, folder, "model")
            log_metrics(
                self.uri,
                self.run_id,
                {f"best_{metric}": metrics[metric], "best_epoch": epoch},
                epoch,
            )
            fig = plots.confusion_matrix(
                metrics["confusion"], self.labels, f"Validation (best epoch: {epoch})"
            )
            log_figure(self.uri, self.run_id, fig, "plots/confusion_matrix_val.png")


def ray_storage(cfg: ExperimentConfig) -> str:
    path = Path(cfg.cluster.storage_path)
    os.makedirs(path, exist_ok=True)
    return str(path)
