"""Checkpoints: a loadable model artifact plus the state needed to resume training."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lepton_ray.config import ExperimentConfig
from lepton_ray.models import ModelMeta, save_model_artifact
from lepton_ray.train.loop import LoopState, unwrap

STATE_FILE = "trainer_state.pt"
BASE_DIR = "base"


def artifact_meta(cfg: ExperimentConfig, labels: list[str]) -> ModelMeta:
    adapter = cfg.peft.method != "none"
    return ModelMeta(
        task=cfg.task,
        labels=labels,
        # A random base cannot be rebuilt from its id, so it travels with the adapter.
        base_model=f"./{BASE_DIR}" if cfg.model.random_init else cfg.model.name,
        max_length=cfg.data.max_length,
        weights="adapter" if adapter else "full",
        peft_method=cfg.peft.method,
        config_overrides={} if cfg.model.random_init else dict(cfg.model.config_overrides),
    )


def write_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    tokenizer,
    meta: ModelMeta,
    optimizer,
    scheduler,
    state: LoopState,
    base_dir: Path | None = None,
) -> Path:
    """Write the artifact (safetensors) and ``trainer_state.pt`` into ``folder``."""
    inner = unwrap(model)
    save_model_artifact(inner, tokenizer, meta, folder)
    if base_dir is not None:
        shutil.copytree(base_dir, folder / BASE_DIR, dirs_exist_ok=True)
    trainable = {n: p.detach().cpu() for n, p in inner.named_parameters() if p.requires_grad}
    torch.save(
        {
            "trainable": trainable,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": state.epoch,
            "best": state.best,
            "history": state.history,
        },
        folder / STATE_FILE,
    )
    return folder


def restore_checkpoint(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> LoopState:
    """Load trainable weights and optimizer state; return where training left off."""
    saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    missing = unwrap(model).load_state_dict(saved["trainable"], strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: {missing.unexpected_keys[:3]}"
        )
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return LoopState(epoch=saved["epoch"], best=saved["best"], history=saved["history"])
