"""The training loop: plain torch, no Ray.

It runs inside a Ray Train worker (``worker.py``), under torchrun, or in one process
(``standalone.py``), so GPU paths can be checked on a machine that has torch but no Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lepton_ray.evaluation import evaluate

Batch = dict[str, torch.Tensor]


@dataclass
class LoopState:
    """What a checkpoint must hold to resume: where we are and what we have seen."""

    epoch: int = 0  # epochs completed
    best: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over trainable weights; biases and norms are not decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up, then linear decay to zero."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        remaining = max(1, total_steps - warmup)
        return max(0.0, 1.0 - (step - warmup) / remaining)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def run_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    train_batches: Callable[[int], Iterable[Batch]],
    eval_batches: Callable[[], Iterable[Batch]],
    epochs: int,
    num_labels: int,
    steps_per_epoch: int,
    device: torch.device,
    state: LoopState,
    metric: str = "val_accuracy",
    mode: str = "max",
    max_grad_norm: float = 1.0,
    max_steps_per_epoch: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    on_epoch_end: Callable[[dict[str, Any], bool], None] | None = None,
    log: Callable[[str], None] = print,
) -> LoopState:
    """Train from ``state.epoch`` to ``epochs``, evaluating after every epoch.

    ``on_epoch_end(metrics, improved)`` is called on every rank (Ray Train's report is a
    barrier); ``metrics`` holds train/val loss, val accuracy and macro-F1, and throughput.
    """
    distributed = world_size > 1 and torch.distributed.is_initialized()
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    log_every = max(1, steps_per_epoch // 5)
    for epoch in range(state.epoch, epochs):
        model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = torch.zeros((), dtype=torch.float64, device=device)
        for step, batch in enumerate(train_batches(epoch)):
            if max_steps_per_epoch and step >= max_steps_per_epoch:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = model(**batch)
            out.loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n = batch["labels"].shape[0]
            loss_sum += out.loss.detach().double() * n
            seen += n
            if rank == 0 and (step + 1) % log_every == 0:
                rate = seen.item() * world_size / (time.perf_counter() - started)
                log(
                    f"[train] epoch {epoch + 1}/{epochs} step {step + 1}/{steps_per_epoch} "
                    f"loss {loss_sum.item() / max(seen.item(), 1):.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.1f} samples/s"
                )
        if distributed:
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(seen)
        train_seconds = time.perf_counter() - started
        val = evaluate(unwrap(model), eval_batches(), num_labels, device, rank, world_size)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum.item() / max(seen.item(), 1.0),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "val_macro_precision": val["macro_precision"],
            "val_macro_recall": val["macro_recall"],
            "train_samples_per_s": seen.item() / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        improved = is_better(metrics[metric], state.best, mode)
        if improved:
            state.best = metrics[metric]
        state.epoch = epoch + 1
        state.history.append(metrics)
        if rank == 0:
            log(
                f"[train] epoch {epoch + 1}/{epochs} done: train_loss {metrics['train_loss']:.4f} "
                f"val_loss {val['loss']:.4f} val_accuracy {val['accuracy']:.4f} "
                f"val_macro_f1 {val['macro_f1']:.4f}" + (" (best)" if improved else "")
            )
        if on_epoch_end is not None:
            on_epoch_end({**metrics, "confusion": val["confusion"]}, improved)
    return state
