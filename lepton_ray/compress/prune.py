"""``compress.prune``: magnitude pruning of the float model before it is quantized.

Two kinds, either or both (heads first, then unstructured on what is left):

- **Heads** (``heads``): from every layer the attention heads with the lowest L2 norm over
  their query/key/value rows and output-projection columns are cut out
  (``lepton_ray.heads``; Llama with grouped-query attention by whole key/value groups). The
  projections really shrink: fewer parameters, a smaller file, less work per token.
- **Unstructured** (``sparsity``): the smallest-magnitude weights over all target Linear
  weights together (global, not per tensor) are set to zero. Targets, by default: every
  Linear weight inside the transformer layers (BERT: query/key/value, attention output,
  intermediate and output dense; Llama: q/k/v/o, gate/up/down projections); never biases,
  embeddings, norms, the pooler or the output head unless ``targets`` names them. The
  zeros are stored and multiplied like any other weight: a dense safetensors file is no
  smaller and dense CPU kernels are no faster. Only a sparse format or kernel would gain,
  and compress makes none; the logged size and speed say so by not changing.

A recovery fine-tune (``recovery_steps``) then trains the pruned model for a few AdamW
steps on the training split, with the task's own batches and loss. The compress stage may
not import the training stage (layout rule), so this is a short loop of its own (no
schedule, no mixed precision, one process); the pruned weights stay zero because each
step's gradient is masked and the mask is applied again after the step (no
``torch.nn.utils.prune`` reparametrization, so the saved weights keep their names).

Scores are measured on validation before pruning, after it and after recovery; the result
then goes through ``compress.method`` and the compression gate like any other model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lepton_ray.errors import ConfigError
from lepton_ray.heads import head_blocks, head_scores, remove_heads


@dataclass
class PruneResult:
    """The pruned model, what pruning did (recorded in the artifact) and its metrics."""

    model: torch.nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def layer_stack(model) -> str:
    """The name of the ``ModuleList`` holding the transformer layers (the one with the most
    parameters: ``bert.encoder.layer``, ``model.layers``)."""
    stacks = [
        (sum(p.numel() for p in m.parameters()), name)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m)
    ]
    if not stacks:
        raise ConfigError(
            "compress.prune: the model has no list of transformer layers to prune; name the "
            "modules in compress.prune.targets"
        )
    return max(stacks)[1]


def prune_targets(model, targets: list[str] | None) -> dict[str, torch.nn.Linear]:
    """The Linear modules whose weights are pruned unstructured, by name: those inside
    ``layer_stack`` (``targets`` null), else those named by ``targets`` (or under them)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    prefixes = [layer_stack(model)] if targets is None else list(targets)
    chosen = {
        n: m for n, m in linears.items() if any(n == t or n.startswith(f"{t}.") for t in prefixes)
    }
    unmatched = [t for t in prefixes if not any(n == t or n.startswith(f"{t}.") for n in chosen)]
    if unmatched:
        tops = sorted({n.rsplit(".", 1)[0] if "." in n else n for n in linears})
        raise ConfigError(
            f"compress.prune.targets: {unmatched[0]!r} names no Linear module of the model; "
            f"Linear modules are under: {', '.join(tops[:12])}"
        )
    return chosen


def magnitude_masks(linears: dict[str, torch.nn.Linear], sparsity: float):
    """Global magnitude masks (True: kept): exactly ``round(sparsity * n)`` of the ``n``
    weights of ``linears`` together, the smallest |w| first, are masked out."""
    weights = [m.weight.detach() for m in linears.values()]
    flat = torch.cat([w.abs().flatten().float() for w in weights])
    k = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        threshold = flat.kthvalue(k).values
        keep &= flat > threshold
        # Ties at the threshold: mask just enough of them (in order) to reach k.
        extra = k - int((~keep).sum()) + int((flat == threshold).sum())
        ties = torch.nonzero(flat == threshold).flatten()
        keep[ties[extra:]] = True
    masks, start = {}, 0
    for name, w in zip(linears, weights, strict=True):
        masks[name] = keep[start : start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
    return masks


def apply_masks(linears: dict[str, torch.nn.Linear], masks) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            linears[name].weight.mul_(mask.to(linears[name].weight.dtype))


def sparsity_of(model, linears: dict[str, torch.nn.Linear]) -> dict[str, float]:
    """Zeros over the pruned weights (``prune_sparsity``), over every parameter of the model
    (``prune_sparsity_all``), and the parameter count."""
    pruned = [m.weight for m in linears.values()]
    zeros = sum(int((w == 0).sum()) for w in pruned)
    count = sum(w.numel() for w in pruned)
    params = {id(p): p for p in model.parameters()}.values()  # a tied tensor once
    all_zeros = sum(int((p == 0).sum()) for p in params)
    total = sum(p.numel() for p in params)
    return {
        "prune_sparsity": zeros / max(count, 1),
        "prune_sparsity_all": all_zeros / max(total, 1),
        "prune_weights": float(count),
        "params_pruned": float(total),
    }


def choose_heads(model, heads: int) -> dict[int, list[int]]:
    """From each layer, the ``heads`` heads (in units of its key/value groups) with the
    lowest ``head_scores``."""
    plan = {}
    for block in head_blocks(model):
        if heads % block.group:
            raise ConfigError(
                f"compress.prune.heads {heads}: this model groups {block.group} query heads "
                f"per key/value head; use a multiple of {block.group}"
            )
        units = heads // block.group
        if units >= block.units:
            raise ConfigError(
                f"compress.prune.heads {heads} would remove every head of layer {block.layer} "
                f"({block.units * block.group} there)"
            )
        order = torch.argsort(head_scores(block), stable=True)
        plan[block.layer] = sorted(int(u) for u in order[:units])
    if not plan:
        raise ConfigError(
            f"compress.prune.heads: no attention heads found in {type(model).__name__} "
            "(bert and llama models only)"
        )
    return plan


def recover(
    model,
    task,
    batches: list[dict[str, Any]],
    steps: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float | None,
    linears: dict[str, torch.nn.Linear],
    masks,
) -> list[float]:
    """``steps`` AdamW steps over ``batches`` (cycled), the task's loss; masked weights get
    no gradient and are zeroed again after every step. Returns each step's loss."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
    )
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        outputs = model(**task.model_inputs(batch, model))
        loss = task.loss(outputs, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, mask in masks.items():
            grad = linears[name].weight.grad
            if grad is not None:
                grad.mul_(mask.to(grad.dtype))
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        apply_masks(linears, masks)  # AdamW's decay and moments must not revive a zero
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _score_line(score: str, *values: tuple[str, float]) -> str:
    return f"validation {score.replace('_', ' ')} " + " -> ".join(
        f"{v:.4f} {tag}" for tag, v in values
    )


def prune_model(
    cfg,
    model,
    task,
    evaluate: Callable[[Any], dict[str, Any] | None],
    training_batches: Callable[[int], list[dict[str, Any]]],
    log: Callable[[str], Any] = print,
    before: dict[str, Any] | None = None,
) -> PruneResult:
    """Prune a copy of the float ``model`` as ``cfg.compress.prune`` says, then recover.

    ``evaluate(model)``: validation scores (``measure.evaluate``'s dict) or None without a
    validation split; ``before``: the float model's, already measured. ``training_batches(rows)``: up to that many training rows, batched.
    Metrics: ``prune_*`` figures and ``val_<score>_pruned`` / ``val_<score>_recovered``.
    """
    p = cfg.compress.prune
    pruned = copy.deepcopy(model).float().eval()
    params_before = sum(x.numel() for x in {id(x): x for x in model.parameters()}.values())
    details: dict[str, Any] = {"sparsity_target": p.sparsity, "heads_per_layer": p.heads}
    metrics: dict[str, float] = {"prune_sparsity_target": p.sparsity, "params_fp32": params_before}
    if p.heads:
        plan = choose_heads(pruned, p.heads)
        details["removed_heads"] = remove_heads(pruned, plan)
        details["head_score"] = "L2 norm of each head's q/k/v rows and output columns"
        metrics["prune_heads_removed"] = float(sum(len(v) for v in plan.values()))
    linears = prune_targets(pruned, p.targets)
    masks = {}
    if p.sparsity > 0:
        masks = magnitude_masks(linears, p.sparsity)
        apply_masks(linears, masks)
    details["targets"] = p.targets or [layer_stack(pruned)]
    metrics.update(sparsity_of(pruned, linears))
    where = "the transformer layers" if p.targets is None else ", ".join(p.targets)
    line = f"[compress] pruned: {int(metrics['prune_weights'])} Linear weights in {where}"
    if p.sparsity > 0:
        line += (
            f" {100 * metrics['prune_sparsity']:.2f}% zero (target {100 * p.sparsity:.2f}%), "
            f"{100 * metrics['prune_sparsity_all']:.2f}% of all parameters; unstructured zeros "
            "are stored and multiplied like other weights: no smaller file, no faster dense kernel"
        )
    if p.heads:
        line += (
            f"; {p.heads} attention heads per layer removed (lowest L2 norm): parameters "
            f"{params_before / 1e6:.2f}M -> {metrics['params_pruned'] / 1e6:.2f}M"
        )
    log(line)
    scores: dict[str, list[tuple[str, float]]] = {}
    if before is not None:
        for name, value in before["scores"].items():
            scores[name] = [("fp32", value)]
    after = evaluate(pruned)
    if after is not None:
        for name, value in after["scores"].items():
            metrics[f"val_{name}_pruned"] = value
            scores.setdefault(name, []).append(("pruned", value))
    if p.recovery_steps:
        rows = p.recovery_steps * cfg.train.batch_size
        batches = training_batches(rows)
        if not batches:
            log("[compress] no training split: compress.prune.recovery_steps skipped")
        else:
            losses = recover(
                pruned,
                task,
                batches,
                p.recovery_steps,
                p.recovery_lr or cfg.train.lr,
                cfg.train.weight_decay,
                cfg.train.max_grad_norm,
                linears,
                masks,
            )
            metrics["prune_recovery_loss_first"] = losses[0]
            metrics["prune_recovery_loss_last"] = losses[-1]
            metrics["prune_sparsity_recovered"] = sparsity_of(pruned, linears)["prune_sparsity"]
            details["recovery_steps"] = p.recovery_steps
            recovered = evaluate(pruned)
            if recovered is not None:
                for name, value in recovered["scores"].items():
                    metrics[f"val_{name}_recovered"] = value
                    scores.setdefault(name, []).append(("recovered", value))
            log(
                f"[compress] recovery: {p.recovery_steps} steps on the training split, loss "
                f"{losses[0]:.4f} -> {losses[-1]:.4f}, pruned weights kept at zero"
            )
    gate = task.gate_score
    if gate in scores:
        log(f"[compress] {_score_line(gate, *scores[gate])}")
    return PruneResult(pruned, details, metrics)


def log_prune_params(tracking_uri: str, run_id: str, details: dict[str, Any]) -> None:
    """What pruning did, as params of the compress run (``prune.*``)."""
    from mlflow.entities import Param

    from lepton_ray.tracking.mlflow import client

    params = [Param(f"prune.{k}", str(v)[:6000]) for k, v in details.items()]
    client(tracking_uri).log_batch(run_id, params=params)
