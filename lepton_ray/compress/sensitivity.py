"""Which Linear layers lose the most to int8: ranked on calibration rows of the training split.

Start from the whole int8 model and put back one layer at a time in float32: the layer
whose return brings the outputs closest to the float model's (the largest fall in the mean
KL divergence of the output distributions: a classifier's class probabilities, a language
model's next-token probabilities at every real token) is the most sensitive. One pass per
layer, each at int8 speed; the validation split is not used, since it is what judges the
result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Inputs = Callable[[dict[str, Any], Any], dict[str, Any]]


def _without_labels(batch: dict[str, Any], model) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _log_probs(model, batches: Sequence[dict[str, Any]], inputs: Inputs) -> list[torch.Tensor]:
    """Per batch: log-probabilities of each output, ``(rows, classes)``; for per-token
    logits only the real tokens' (padding cut by the attention mask), ``(tokens, vocab)``."""
    out = []
    with torch.inference_mode():
        for b in batches:
            logits = model(**inputs(_without_labels(b, model), model)).logits.float()
            if logits.dim() == 3 and "attention_mask" in b:
                logits = logits[b["attention_mask"].bool()]
            out.append(torch.log_softmax(logits, dim=-1))
    return out


def _kl(
    reference: list[torch.Tensor], model, batches: Sequence[dict[str, Any]], inputs: Inputs
) -> float:
    """Mean KL(float || model) per output (row, or token)."""
    total, rows = 0.0, 0
    for ref, got in zip(reference, _log_probs(model, batches, inputs), strict=True):
        total += float((ref.exp() * (ref - got)).sum())
        rows += len(ref)
    return total / max(rows, 1)


def rank_linears(
    model: torch.nn.Module,
    batches: Sequence[dict[str, Any]],
    keep_float: Sequence[str] = (),
    per_channel: bool = True,
    embeddings: bool = True,
    inputs: Inputs | None = None,
) -> list[tuple[str, float]]:
    """``(name, score)`` for every Linear that int8 would quantize, most sensitive first.

    ``score``: how much the mean KL divergence from the float model falls when that one
    layer stays float32 and every other is int8 (as ``quantize_dynamic_int8`` with the
    same recipe makes them). ``inputs(batch, model)``: what the forward pass takes of a
    batch without its labels (the task's ``model_inputs``; default: that batch as is).
    """
    from lepton_ray.compress.formats import quantize_dynamic_int8, quantized_linears
    from lepton_ray.compress.modules import replace_module

    inputs = inputs or _without_labels
    model = model.eval()
    reference = _log_probs(model, batches, inputs)
    qmodel = quantize_dynamic_int8(
        model, per_channel=per_channel, keep_float=keep_float, embeddings=embeddings
    )
    base = _kl(reference, qmodel, batches, inputs)
    scores = []
    for name, quantized in quantized_linears(qmodel).items():
        replace_module(qmodel, name, model.get_submodule(name))
        scores.append((name, base - _kl(reference, qmodel, batches, inputs)))
        replace_module(qmodel, name, quantized)
    return sorted(scores, key=lambda item: -item[1])
