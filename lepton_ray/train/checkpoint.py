"""Checkpoints: a loadable model artifact plus the state needed to resume training.

<artifact files>        see lepton_ray.artifacts (safetensors weights, lepton_model.json)
base/                   a random base model, when the adapter needs it
trainable.safetensors   the trainable weights (LoRA, head, or all of them), by parameter name
trainer_state.pt        optimizer (by parameter name), scheduler and loop state (epoch,
                        batch, step, best, early-stopping count, history): tensors and
                        plain Python values only, read with ``torch.load(weights_only=True)``

Randomness needs no saved generator state: batch order and dropout are functions of
(seed, epoch, rank, step), all of which the loop state holds.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from lepton_ray.artifacts import ModelMeta, save_model_artifact
from lepton_ray.config import MODEL_ALIASES, ExperimentConfig
from lepton_ray.errors import StageError
from lepton_ray.train.loop import LoopState

STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
BASE_DIR = "base"


def base_travels(cfg: ExperimentConfig) -> bool:
    """Whether the base model is copied into every artifact: one that no model id rebuilds
    (random weights, or another artifact's under a new adapter)."""
    return cfg.model.random_init or (cfg.peft.method != "none" and bool(cfg.model.init_from))


def artifact_meta(cfg: ExperimentConfig, labels: list[str]) -> ModelMeta:
    adapter = cfg.peft.method != "none"
    own_base = base_travels(cfg)
    name = cfg.model.name
    if not cfg.model.random_init and name.lower() not in MODEL_ALIASES and name.startswith("."):
        # "./x" in an artifact means "inside the artifact"; a local base is recorded absolute.
        name = str(Path(name).expanduser().resolve())
    return ModelMeta(
        task=cfg.task,
        labels=labels,
        # A random base cannot be rebuilt from its id, so it travels with the adapter.
        base_model=f"./{BASE_DIR}" if own_base else name,
        max_length=cfg.data.max_length,
        weights="adapter" if adapter else "full",
        peft_method=cfg.peft.method,
        config_overrides={} if own_base else dict(cfg.model.config_overrides),
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


def write_checkpoint_files(
    folder: Path,
    model: torch.nn.Module,
    tokenizer,
    meta: ModelMeta,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler,
    state: LoopState,
    base_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the artifact, ``trainable.safetensors`` and ``trainer_state.pt`` into ``folder``.

    ``model`` is a plain module holding the current weights (the unwrapped DDP module, or
    rank 0's export copy under FSDP); ``trainable`` and ``optimizer_state`` are whole,
    by parameter name (``parallel.full_state``).
    """
    save_model_artifact(model, tokenizer, meta, folder)
    if base_dir is not None:
        shutil.copytree(base_dir, folder / BASE_DIR, dirs_exist_ok=True)
    save_trainable(trainable, folder)
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "loop": _plain(state.to_dict()),
            "epoch": int(state.epoch),
            **_plain(extra or {}),
        },
        folder / STATE_FILE,
    )
    return folder


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
    """``write_checkpoint_files`` for a plain or DDP-wrapped model (no collective needed)."""
    from lepton_ray.train.parallel import full_state, unwrap

    trainable, optimizer_state = full_state(model, optimizer)
    return write_checkpoint_files(
        folder, unwrap(model), tokenizer, meta, trainable, optimizer_state, scheduler, state,
        base_dir,
    )  # fmt: skip


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


ALIASES_KEY = "lepton_aliases"


def _untied(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights once (safetensors refuses tensors that share memory, such as a language
    model's lm_head and its embeddings): the first name keeps the tensor, the others are
    recorded as aliases of it."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        t = tensor.detach()
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.cpu().contiguous()
    return kept, aliases


def save_trainable(trainable: dict[str, torch.Tensor], folder: Path) -> None:
    """``trainable.safetensors``: each tensor once, tied names as aliases in its metadata."""
    from safetensors.torch import save_file

    kept, aliases = _untied(trainable)
    save_file(kept, str(folder / TRAINABLE_FILE), metadata={ALIASES_KEY: json.dumps(aliases)})


def _load_trainable(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = folder / TRAINABLE_FILE
    if not path.is_file():
        raise StageError(f"{path}: trainable weights not found")
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get(ALIASES_KEY) or "{}")
    except (SafetensorError, OSError, ValueError) as err:
        raise StageError(f"{path}: not a valid safetensors file ({err})") from None
    for name, source in aliases.items():
        tensors[name] = tensors[source]
    return tensors


def check_checkpoint(folder: Path | str) -> Path:
    """A folder a run can resume from, or one clear error naming what is missing."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StageError(f"train.resume_from: checkpoint folder {folder} does not exist")
    for name in (STATE_FILE, TRAINABLE_FILE):
        if not (folder / name).is_file():
            raise StageError(
                f"train.resume_from: {folder} is not a lepton-ray checkpoint (no {name})"
            )
    return folder


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Everything a resume needs, read safely (safetensors + ``weights_only`` state)."""
    folder = Path(folder)
    saved = _load_state(folder / STATE_FILE)
    loop = saved.get("loop") or {"epoch": int(saved["epoch"])}
    return {
        "trainable": _load_trainable(folder),
        "optimizer": saved["optimizer"],
        "scheduler": saved["scheduler"],
        "state": LoopState.from_dict(loop),
        "extra": {k: v for k, v in saved.items() if k not in ("optimizer", "scheduler", "loop")},
    }


def restore_checkpoint(folder: Path, model: torch.nn.Module, optimizer, scheduler) -> LoopState:
    """Load trainable weights, optimizer and scheduler state; return where training left off.

    ``model`` may be plain, DDP-wrapped or FSDP-sharded: the whole weights are put back
    through ``parallel.load_full_state`` (every rank calls this under FSDP).
    """
    from lepton_ray.train.parallel import load_full_state

    folder = Path(folder)
    saved = read_checkpoint(folder)
    try:
        load_full_state(model, optimizer, saved["trainable"], saved["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
        raise StageError(f"checkpoint {folder} does not match the model: {first[:300]}") from None
    except StageError as err:
        raise StageError(f"checkpoint {folder}: {err}") from None
    scheduler.load_state_dict(saved["scheduler"])
    return saved["state"]
