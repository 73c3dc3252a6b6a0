"""Checkpoints: a loadable model artifact plus the state needed to resume training.

<artifact files>        see lepton_ray.models (safetensors weights, lepton_model.json)
base/                   a random base model, when the adapter needs it
trainable.safetensors   the trainable weights (LoRA, head, or all of them)
trainer_state.pt        optimizer, scheduler and loop state: tensors and plain Python
                        values only, read back with ``torch.load(weights_only=True)``
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from lepton_ray.config import MODEL_ALIASES, ExperimentConfig
from lepton_ray.errors import StageError
from lepton_ray.models import ModelMeta, save_model_artifact
from lepton_ray.train.loop import LoopState, unwrap

STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
BASE_DIR = "base"


def artifact_meta(cfg: ExperimentConfig, labels: list[str]) -> ModelMeta:
    adapter = cfg.peft.method != "none"
    name = cfg.model.name
    if not cfg.model.random_init and name.lower() not in MODEL_ALIASES and name.startswith("."):
        # "./x" in an artifact means "inside the artifact"; a local base is recorded absolute.
        name = str(Path(name).expanduser().resolve())
    return ModelMeta(
        task=cfg.task,
        labels=labels,
        # A random base cannot be rebuilt from its id, so it travels with the adapter.
        base_model=f"./{BASE_DIR}" if cfg.model.random_init else name,
        max_length=cfg.data.max_length,
        weights="adapter" if adapter else "full",
        peft_method=cfg.peft.method,
        config_overrides={} if cfg.model.random_init else dict(cfg.model.config_overrides),
        cleaning={
            "unicode_form": cfg.data.clean.unicode_form,
            "lowercase": bool(cfg.data.clean.lowercase),
            "strip_html": bool(cfg.data.clean.strip_html),
            "mask_pii": list(cfg.data.clean.mask_pii),
        },
    )


def _plain(value: Any) -> Any:
    """Numbers as Python floats/ints (numpy scalars would not load with weights_only)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return _plain(value.item())
    return float(value)


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
    """Write the artifact, ``trainable.safetensors`` and ``trainer_state.pt`` into ``folder``."""
    from safetensors.torch import save_file

    inner = unwrap(model)
    save_model_artifact(inner, tokenizer, meta, folder)
    if base_dir is not None:
        shutil.copytree(base_dir, folder / BASE_DIR, dirs_exist_ok=True)
    trainable = {
        n: p.detach().cpu().contiguous() for n, p in inner.named_parameters() if p.requires_grad
    }
    save_file(trainable, str(folder / TRAINABLE_FILE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": int(state.epoch),
            "best": None if state.best is None else float(state.best),
            "history": _plain(state.history),
        },
        folder / STATE_FILE,
    )
    return folder


def _load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path}: checkpoint state file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's own message is long; keep the line that says what was found.
        boiler = ("Weights only load failed", "Check the documentation", "Please file an issue")
        picked = [line for line in lines if not line.startswith(boiler)]
        reason = (picked or lines or [type(err).__name__])[0]
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise StageError(
            f"{path} is not a plain tensor/value state file; refusing to unpickle it "
            f"(weights_only load failed: {reason})"
        ) from None
    keys = saved.keys() if isinstance(saved, dict) else set()
    missing = {"optimizer", "scheduler", "epoch"} - keys
    if missing:
        raise StageError(f"{path}: not a lepton-ray trainer state (missing {sorted(missing)})")
    return saved


def _load_trainable(folder: Path, saved: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / TRAINABLE_FILE
    if path.is_file():
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise StageError(f"{path}: not a valid safetensors file ({err})") from None
    if isinstance(saved.get("trainable"), dict):  # older checkpoints kept them in the state
        return saved["trainable"]
    raise StageError(f"{path}: trainable weights not found")


def restore_checkpoint(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> LoopState:
    """Load trainable weights and optimizer state; return where training left off."""
    folder = Path(folder)
    saved = _load_state(folder / STATE_FILE)
    trainable = _load_trainable(folder, saved)
    inner = unwrap(model)
    wanted = {n for n, p in inner.named_parameters() if p.requires_grad}
    absent = sorted(wanted - trainable.keys())
    try:
        result = inner.load_state_dict(trainable, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise StageError(f"checkpoint {folder} does not match the model: {first}") from None
    if result.unexpected_keys or absent:
        raise StageError(
            f"checkpoint {folder} does not match the model: "
            f"unexpected {result.unexpected_keys[:3]}, missing {absent[:3]}"
        )
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return LoopState(
        epoch=int(saved["epoch"]),
        best=saved.get("best"),
        history=list(saved.get("history") or []),
    )
