"""The Ray Train worker: wraps the pure-torch recipe with Ray's data, DDP and reporting."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lepton_ray.config import ExperimentConfig, validate_experiment
from lepton_ray.tasks import get_task
from lepton_ray.train.batching import TokenRows
from lepton_ray.train.loop import PLOT_INPUTS


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. ``loop_config`` is built by ``driver.build_trainer``."""
    import ray.train
    import ray.train.torch
    import torch

    from lepton_ray.train.recipe import fit_to_length, setup_recipe, train_recipe, training_rows

    # Not re-checked here: the data files are the driver's (CHECK_FILES).
    cfg = validate_experiment(loop_config["experiment"], "worker", check_files=False)
    manifest = loop_config["manifest"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.torch_threads or max(1, int(cfg.scaling.resources_per_worker.get("CPU", 1)))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    target = get_task(cfg.task).stored_targets()
    rows = shard_rows(ray.train.get_dataset_shard("train"), target)
    rows = training_rows(cfg, rows, log=print if rank == 0 else (lambda _: None))
    validation = fit_to_length(
        cfg,
        shard_rows(ray.train.get_dataset_shard("validation"), target),
        "validation",
        log=print if rank == 0 else (lambda _: None),
    )
    recipe = setup_recipe(cfg, manifest, len(rows), device, rank, world)
    nodes = worker_nodes(world)
    tracker = _RankZeroTracker(cfg, loop_config.get("mlflow_run_id"), recipe) if rank == 0 else None
    if tracker is not None:
        tracker.on_placement(nodes)

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        scalar = {k: v for k, v in metrics.items() if k not in _NOT_REPORTED}
        if tracker is not None:
            tracker.on_evaluation(metrics, folder)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(scalar, checkpoint=checkpoint)

    on_log = tracker.on_log if tracker is not None else None
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as resume_dir:
            train_recipe(
                recipe,
                rows,
                validation,
                device,
                rank,
                world,
                report,
                Path(resume_dir),
                on_log=on_log,
            )
    else:
        start = loop_config.get("resume_from")
        train_recipe(
            recipe, rows, validation, device, rank, world, report,
            Path(start) if start else None, on_log=on_log,
        )  # fmt: skip


TAG_WORKER_NODES = "lepton.worker_nodes"
"""The Ray node id of every worker, by rank (what ran where: lineage, and the multi-node test)."""


def worker_nodes(world: int) -> list[str]:
    """Each rank's Ray node id, gathered over the process group the trainer set up."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world < 2 or not dist.is_initialized():
        return [node]
    gathered: list[str | None] = [None] * world
    dist.all_gather_object(gathered, node)
    return [str(n) for n in gathered]


_NOT_REPORTED = (PLOT_INPUTS,)


def shard_rows(shard, target: str | tuple[str, ...]) -> TokenRows:
    """A worker's share of a split, read once into memory in a canonical order.

    The split reaches the worker through Ray Data (no shared filesystem needed); its
    batches are then drawn in a seeded order of its own (``batching.epoch_batches``), so
    a restarted worker sees exactly the batches it would have seen.
    """
    return TokenRows.from_frames(
        shard.iter_batches(batch_size=8192, batch_format="pandas"), target, sort_by_text=True
    )


class _RankZeroTracker:
    """MLflow logging from rank 0 only: metrics per step and per evaluation, the best model
    and the pictures (learning curves; confusion matrix and ROC curve of the best model)."""

    def __init__(self, cfg: ExperimentConfig, run_id: str | None, recipe):
        self.cfg = cfg
        self.run_id = run_id
        self.uri = cfg.tracking.tracking_uri
        self.labels = recipe.labels
        self.task = recipe.task
        self.history: list[dict[str, Any]] = []
        if run_id:
            from lepton_ray.tracking.mlflow import log_metrics

            log_metrics(self.uri, run_id, recipe.counts, step=0)

    def on_placement(self, nodes: list[str]) -> None:
        if self.run_id:
            from lepton_ray.tracking.mlflow import set_tags

            distinct = sorted(set(nodes))
            set_tags(
                self.uri,
                self.run_id,
                {TAG_WORKER_NODES: ",".join(nodes), "lepton.num_nodes": len(distinct)},
            )

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        if self.run_id:
            from lepton_ray.tracking.mlflow import log_metrics

            log_metrics(self.uri, self.run_id, metrics, step)

    def on_evaluation(self, metrics: dict[str, Any], folder: Path | None) -> None:
        """Log one evaluation, and the pictures as they stand now.

        Plots go out with every report, not at the end: Tune's scheduler may stop a trial
        right after any report, and its workers with it.
        """
        if not self.run_id:
            return
        from lepton_ray.tracking import plots
        from lepton_ray.tracking.mlflow import log_figure, log_folder, log_metrics, log_table

        step = int(metrics["step"])
        for name, rows in self.task.tables(metrics[PLOT_INPUTS]).items():
            rows = [{"step": step, "epoch": round(float(metrics["epoch"]), 3), **r} for r in rows]
            log_table(self.uri, self.run_id, rows, f"{name}/step_{step:06d}.json")
        scalars = {k: v for k, v in metrics.items() if k not in _NOT_REPORTED}
        log_metrics(self.uri, self.run_id, scalars, step)
        self.history.append({k: v for k, v in scalars.items() if k != "improved"})
        log_figure(
            self.uri, self.run_id, plots.learning_curves(self.history), "plots/learning_curves.png"
        )
        if metrics["improved"] and folder is not None:
            metric = self.cfg.tune.metric
            log_folder(self.uri, self.run_id, folder, "model")
            log_metrics(
                self.uri,
                self.run_id,
                {
                    f"best_{metric}": metrics[metric],
                    "best_step": step,
                    "best_epoch": metrics["epoch"],
                },
                step,
            )
            title = f"Validation (best: step {step}, epoch {metrics['epoch']:.2f})"
            figures = self.task.plots(metrics[PLOT_INPUTS], self.labels, title)
            for name, fig in figures.items():
                log_figure(self.uri, self.run_id, fig, f"plots/{name}_val.png")


def ray_storage(cfg: ExperimentConfig) -> tuple[str, Any]:
    """Ray Train/Tune's ``storage_path`` and ``storage_filesystem``.

    A local folder is created here (every node must see it, see storage.py) and needs no
    filesystem; an object-store root gives the path inside its bucket and the ``pyarrow.fs``
    filesystem built from the environment (endpoint, region; credentials are read by each
    worker from its own environment)."""
    from lepton_ray.runtime.uri import Uri, resolve

    root = cfg.checkpoint_root
    if isinstance(root, Uri):
        fs, path = resolve(root)
        return path, fs
    os.makedirs(root, exist_ok=True)
    return str(root), None
