"""Data and model parallelism for the loop: DDP or FSDP2, and whole-model state for checkpoints.

Plain torch (no Ray): Ray Train, torchrun or a single process set up the process group;
this module only wraps the model and moves state in and out of it.

- ``ddp``: ``DistributedDataParallel`` (gloo on CPUs, NCCL on GPUs); every worker holds
  the whole model.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``), one unit per transformer layer
  (the blocks of the model's largest ``ModuleList``) plus the root: parameters, gradients
  and optimizer state are sharded across workers and each layer is gathered only while it
  runs. Works with frozen weights (LoRA) and on CPUs over gloo.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lepton_ray.errors import StageError


def distributed(world_size: int) -> bool:
    return (
        world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    )


def layer_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The per-layer wrap policy: the blocks of the largest ``ModuleList`` of one class."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                best = list(module)
    return best


def check_fsdp(model: torch.nn.Module, world_size: int, min_params_per_worker: int) -> None:
    """Refuse, with the reason, a model FSDP cannot usefully shard over ``world_size``."""
    units = layer_units(model)
    if not units:
        raise StageError(
            f"train.strategy fsdp: {type(model).__name__} has no repeated layers "
            "(a ModuleList of blocks) to shard one by one; use train.strategy: ddp"
        )
    total = sum(p.numel() for p in model.parameters())
    per_worker = total // max(world_size, 1)
    if per_worker < min_params_per_worker:
        raise StageError(
            f"train.strategy fsdp: the model has {total:,} parameters, {per_worker:,} per "
            f"worker over {world_size} workers, below train.fsdp_min_params_per_worker "
            f"({min_params_per_worker:,}): too small to shard; use train.strategy: ddp"
        )


def wrap_model(
    model: torch.nn.Module, strategy: str, device: torch.device, world_size: int
) -> torch.nn.Module:
    """Move ``model`` to ``device`` and wrap it for ``strategy`` when there are several workers."""
    model = model.to(device)
    if not distributed(world_size):
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in layer_units(model):
            fully_shard(unit)
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP (FSDP2 shards in place: there is nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP and FSDP2)."""
    if enabled:
        yield
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Trainable weights and optimizer state, whole (unsharded), on the CPU, by parameter name.

    With FSDP this is a collective: every rank must call it. Names are those of the
    unwrapped model, so a checkpoint does not depend on the strategy that wrote it.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(
        model, optimizer, options=_options(cpu_offload=True, ignore_frozen_params=True)
    )
    return weights, optim


def load_full_state(model: torch.nn.Module, optimizer, weights: dict, optim: dict) -> None:
    """Put whole trainable weights and optimizer state back (sharding them under FSDP)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    wanted = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    missing = sorted(_plain_names(wanted) - set(weights))
    if missing:
        raise StageError(f"checkpoint does not match the model: missing {missing[:3]}")
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=optim,
        options=_options(strict=False),
    )


def _plain_names(names: set[str]) -> set[str]:
    """Parameter names as state dicts spell them (FSDP/compile wrappers removed)."""
    return {n.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "") for n in names}
