"""One training run, set up in small steps; shared by the Ray worker and the standalone entry.

No Ray here: the caller supplies rank, world size, device, the rows and a ``report``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lepton_ray.artifacts import ModelMeta, build_model, load_tokenizer
from lepton_ray.config import ExperimentConfig, resolve_model_path
from lepton_ray.errors import StageError
from lepton_ray.tasks import Task, get_task
from lepton_ray.train.batching import TokenRows
from lepton_ray.train.checkpoint import (
    artifact_meta,
    base_travels,
    restore_checkpoint,
    write_checkpoint_files,
)
from lepton_ray.train.loop import (
    LoopSettings,
    LoopState,
    build_optimizer,
    build_scheduler,
    run_training,
)
from lepton_ray.train.parallel import check_fsdp, distributed, full_state, unwrap, wrap_model
from lepton_ray.train.peft import apply_peft, parameter_counts
from lepton_ray.train.peft_methods import loraplus_ratio
from lepton_ray.train.precision import Precision, resolve_precision
from lepton_ray.train.technique_setup import build_techniques
from lepton_ray.train.techniques import Techniques


@dataclass
class Recipe:
    cfg: ExperimentConfig
    task: Task
    labels: list[str]
    model: torch.nn.Module
    export: torch.nn.Module | None  # rank 0's unsharded copy under FSDP (checkpoints)
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    settings: LoopSettings
    meta: ModelMeta
    base_dir: Path | None
    counts: dict[str, int]
    techniques: Techniques = field(default_factory=Techniques)


def build_peft_model(cfg: ExperimentConfig, labels: list[str]) -> torch.nn.Module:
    """The configured model with its adapter, as training starts from it."""
    return apply_peft(
        build_model(cfg.model, cfg.task, labels, seed=cfg.train.seed), cfg.peft, cfg.task
    )


def setup_recipe(
    cfg: ExperimentConfig,
    manifest: dict[str, Any],
    train_rows: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = print,
) -> Recipe:
    """Model (+PEFT) wrapped for the strategy, tokenizer, optimizer, schedule and precision.

    ``train_rows`` is the number of rows this worker trains on per epoch.
    """
    torch.manual_seed(cfg.train.seed)
    labels = manifest["labels"]
    model = build_model(cfg.model, cfg.task, labels, seed=cfg.train.seed)
    base_dir = None
    if base_travels(cfg) and rank == 0:
        base_dir = Path(tempfile.mkdtemp(prefix="lepton-base-"))
        model.save_pretrained(base_dir, safe_serialization=True)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: a frozen base under LoRA would give the adapter no gradient otherwise.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    settings = LoopSettings.from_config(cfg)
    steps = settings.steps_per_epoch(train_rows)
    model = apply_peft(
        model,
        cfg.peft,
        cfg.task,
        total_steps=steps * cfg.train.epochs,
        tokenizer_path=resolve_model_path(cfg.model.name) if cfg.peft.method == "prompt" else None,
    )
    counts = parameter_counts(model)
    strategy = cfg.train.strategy
    sharded = strategy == "fsdp" and distributed(world_size)
    if strategy == "fsdp":
        check_fsdp(model, world_size, cfg.train.fsdp_min_params_per_worker)
    # Under FSDP the live model is sharded; rank 0 keeps a plain copy to write artifacts.
    export = build_peft_model(cfg, labels) if sharded and rank == 0 else None
    model = wrap_model(model, strategy, device, world_size)
    precision = resolve_precision(cfg.train.precision, device)
    optimizer = build_optimizer(
        model, cfg.train.lr, cfg.train.weight_decay, loraplus_ratio(cfg.peft)
    )
    scheduler = build_scheduler(
        optimizer, steps * cfg.train.epochs, cfg.train.warmup_ratio, cfg.train.lr_schedule
    )
    if rank == 0:
        log(
            f"[train] {strategy} x {world_size} on {device.type}, {precision.reason}; "
            f"{counts['params_trainable']:,} of {counts['params_total']:,} weights trainable "
            f"({counts['params_trainable_share']:.2%}, peft.method {cfg.peft.method})"
        )
    task = get_task(cfg.task)
    tokenizer = task.prepare_tokenizer(load_tokenizer(cfg.model.name), cfg)
    meta = artifact_meta(cfg, labels)
    meta.extra.update(task.meta_extra(tokenizer, cfg))
    techniques = build_techniques(cfg, model, task, device, rank, log)
    return Recipe(
        cfg,
        task,
        labels,
        model,
        export,
        tokenizer,
        optimizer,
        scheduler,
        precision,
        settings,
        meta,
        base_dir,
        counts,
        techniques,
    )


def eval_batches_of(
    task: Task, rows: TokenRows, batch_size: int, pad_id: int, tokenizer=None, cfg=None
) -> Callable[[], Any]:
    """What every evaluation scores (``task.evaluation_data``); the same on every rank."""
    data = task.evaluation_data(rows, batch_size, pad_id, tokenizer, cfg)
    return lambda: data


def fit_to_length(
    cfg: ExperimentConfig, rows: TokenRows, split: str, log: Callable[[str], None] = print
) -> TokenRows:
    """Rows cut to ``data.max_length`` where they were tokenized longer: a sweep that
    searches ``data.max_length`` tokenizes once at the config's own length, and each trial
    cuts its rows as its task says (``Task.shortener``). Rows that fit come back as they are."""
    limit = cfg.data.max_length
    if not len(rows) or int(rows.lengths.max()) <= limit:
        return rows
    special = set(load_tokenizer(cfg.model.name).all_special_ids)
    fitted, cut, dropped = rows.refit(get_task(cfg.task).shortener(limit, special, cfg))
    log(
        f"[train] data.max_length {limit}: {cut} of {len(rows)} {split} rows cut to it"
        + (f", {dropped} dropped (data.chat.too_long)" if dropped else "")
    )
    return fitted


def training_rows(cfg: ExperimentConfig, rows: TokenRows, log: Callable[[str], None] = print):
    """A worker's training rows as the loop batches them: cut to ``data.max_length``
    (``fit_to_length``), and packed into rows of that many tokens with ``data.packing``."""
    rows = fit_to_length(cfg, rows, "train", log)
    if not cfg.data.packing:
        return rows
    from lepton_ray.train.packing import pack_rows

    packed = pack_rows(rows, cfg.data.max_length)
    log(
        f"[train] packing: {len(rows)} examples in {len(packed)} rows of "
        f"{cfg.data.max_length} tokens ({rows.tokens / max(1, len(packed) * cfg.data.max_length):.0%} real)"
    )
    return packed


def split_folder(cfg: ExperimentConfig, split: str):
    """The folder of a preprocessed split, or one clear error if preprocessing did not write it."""
    from lepton_ray.runtime.uri import exists

    folder = cfg.data_dir / split
    if not exists(folder):
        # Never an empty frame: every evaluation would score 0 and the first would win.
        raise StageError(
            f"no {split} split at {folder}; run `lepton-ray preprocess` again "
            "(data.split.validation must be above 0)"
        )
    return folder


def read_split(cfg: ExperimentConfig, split: str) -> TokenRows:
    """A preprocessed split from the data folder (the standalone path; Ray passes datasets)."""
    import pandas as pd

    from lepton_ray.runtime.uri import resolve

    fs, path = resolve(split_folder(cfg, split))
    frame = pd.read_parquet(path, filesystem=fs)
    return TokenRows.from_frames([frame], get_task(cfg.task).stored_targets())


RESUMED_AT_STEP = "resumed_at_step"
"""Metric logged once per restore from a checkpoint: the optimizer step training went on from."""


def train_recipe(
    recipe: Recipe,
    rows: TokenRows,
    validation: TokenRows,
    device: torch.device,
    rank: int,
    world_size: int,
    report: Callable[[dict[str, Any], Path | None], None],
    resume_from: Path | None = None,
    log: Callable[[str], None] = print,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> LoopState:
    """Run the loop; after each evaluation rank 0 writes a checkpoint and every rank reports."""
    cfg = recipe.cfg
    state = LoopState()
    if resume_from is not None:
        state = restore_checkpoint(resume_from, recipe.model, recipe.optimizer, recipe.scheduler)
        if rank == 0:
            log(
                f"[train] resumed from {resume_from}: epoch {state.epoch + 1}, "
                f"batch {state.batch}, step {state.step}"
            )
            if on_log is not None:  # where each restore started, for MLflow (and the tests)
                on_log(state.step, {RESUMED_AT_STEP: state.step})
    sharded = cfg.train.strategy == "fsdp" and distributed(world_size)

    def on_evaluation(metrics: dict[str, Any], improved: bool, state: LoopState) -> None:
        # stopped_early: the sweep tells a trial that stopped itself from one ASHA stopped.
        metrics = {**metrics, "improved": improved, "stopped_early": state.stopped_early}
        weights = optim = None
        if sharded or rank == 0:
            weights, optim = full_state(recipe.model, recipe.optimizer)  # collective under FSDP
        if rank != 0:
            report(metrics, None)
            return
        plain = unwrap(recipe.model)
        if recipe.export is not None:
            recipe.export.load_state_dict(weights, strict=False)
            plain = recipe.export
        with tempfile.TemporaryDirectory(prefix="lepton-ckpt-") as tmp:
            folder = write_checkpoint_files(
                Path(tmp),
                plain,
                recipe.tokenizer,
                recipe.meta,
                weights,
                optim,
                recipe.scheduler,
                state,
                recipe.base_dir,
                extra={"world_size": world_size, "seed": cfg.train.seed},
            )
            report(metrics, folder)

    pad_id = recipe.tokenizer.pad_token_id or 0
    try:
        return run_training(
            recipe.model,
            recipe.optimizer,
            recipe.scheduler,
            rows,
            pad_id=pad_id,
            eval_batches=eval_batches_of(
                recipe.task, validation, cfg.train.eval_batch_size, pad_id, recipe.tokenizer, cfg
            ),
            task=recipe.task,
            labels=recipe.labels,
            settings=recipe.settings,
            state=state,
            device=device,
            precision=recipe.precision,
            rank=rank,
            world_size=world_size,
            on_evaluation=on_evaluation,
            on_log=on_log,
            log=log,
            techniques=recipe.techniques,
        )
    finally:
        if recipe.base_dir is not None:  # the random base copied into every checkpoint
            shutil.rmtree(recipe.base_dir, ignore_errors=True)
