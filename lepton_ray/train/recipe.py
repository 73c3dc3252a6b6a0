"""One training run, set up in small steps; shared by the Ray worker and the standalone entry.

No Ray here: the caller supplies rank, world size, device and the training batches.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lepton_ray.config import ExperimentConfig
from lepton_ray.evaluation import frame_batches
from lepton_ray.models import ModelMeta, build_model, load_tokenizer
from lepton_ray.train.checkpoint import artifact_meta, restore_checkpoint, write_checkpoint
from lepton_ray.train.loop import LoopState, build_optimizer, build_scheduler, run_epochs
from lepton_ray.train.peft import apply_peft, parameter_counts


@dataclass
class Recipe:
    cfg: ExperimentConfig
    labels: list[str]
    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    meta: ModelMeta
    base_dir: Path | None
    steps_per_epoch: int
    counts: dict[str, int]


def setup_recipe(
    cfg: ExperimentConfig,
    manifest: dict[str, Any],
    world_size: int,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
) -> Recipe:
    """Model (+PEFT), tokenizer, optimizer and schedule for one run.

    ``wrap`` moves the model to its device and wraps it for data parallelism (DDP).
    """
    torch.manual_seed(cfg.train.seed)
    labels = manifest["labels"]
    model = build_model(cfg.model, cfg.task, labels, seed=cfg.train.seed)
    base_dir = None
    if cfg.model.random_init:
        base_dir = Path(tempfile.mkdtemp(prefix="lepton-base-"))
        model.save_pretrained(base_dir, safe_serialization=True)
    model = apply_peft(model, cfg.peft, cfg.task)
    counts = parameter_counts(model)
    model = wrap(model)
    tokenizer = load_tokenizer(cfg.model.name)
    train_rows = manifest["splits"]["train"]
    steps = max(1, math.ceil(train_rows / world_size / cfg.train.batch_size))
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, steps * cfg.train.epochs, cfg.train.warmup_ratio)
    return Recipe(
        cfg,
        labels,
        model,
        tokenizer,
        optimizer,
        scheduler,
        artifact_meta(cfg, labels),
        base_dir,
        steps,
        counts,
    )


def validation_batches(cfg: ExperimentConfig, tokenizer) -> Callable[[], Iterable]:
    """The whole validation split, read once; every rank iterates it (and takes its share)."""
    import pandas as pd

    from lepton_ray.errors import StageError

    folder = cfg.data_dir / "validation"
    if not folder.exists():
        # Never an empty frame: every epoch would score 0 and the first one would win.
        raise StageError(
            f"no validation split at {folder}; run `lepton-ray preprocess` again "
            "(data.split.validation must be above 0)"
        )
    frame = pd.read_parquet(folder)
    pad = tokenizer.pad_token_id or 0
    return lambda: frame_batches(frame, cfg.train.eval_batch_size, pad)


def train_recipe(
    recipe: Recipe,
    train_batches: Callable[[int], Iterable],
    device: torch.device,
    rank: int,
    world_size: int,
    report: Callable[[dict[str, Any], Path | None], None],
    resume_from: Path | None = None,
    log: Callable[[str], None] = print,
) -> LoopState:
    """Run the epochs; after each, rank 0 writes a checkpoint and everyone calls ``report``."""
    cfg = recipe.cfg
    state = LoopState()
    if resume_from is not None:
        state = restore_checkpoint(resume_from, recipe.model, recipe.optimizer, recipe.scheduler)
        log(f"[train] resumed from {resume_from} after epoch {state.epoch}")

    def on_epoch_end(metrics: dict[str, Any], improved: bool) -> None:
        metrics = {**metrics, "improved": improved}
        if rank != 0:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="lepton-ckpt-") as tmp:
            folder = write_checkpoint(
                Path(tmp),
                recipe.model,
                recipe.tokenizer,
                recipe.meta,
                recipe.optimizer,
                recipe.scheduler,
                state,
                recipe.base_dir,
            )
            report(metrics, folder)

    return run_epochs(
        recipe.model,
        recipe.optimizer,
        recipe.scheduler,
        train_batches=train_batches,
        eval_batches=validation_batches(cfg, recipe.tokenizer),
        epochs=cfg.train.epochs,
        num_labels=len(recipe.labels),
        steps_per_epoch=recipe.steps_per_epoch,
        device=device,
        state=state,
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
        max_grad_norm=cfg.train.max_grad_norm,
        max_steps_per_epoch=cfg.train.max_steps_per_epoch,
        rank=rank,
        world_size=world_size,
        on_epoch_end=on_epoch_end,
        log=log,
    )
