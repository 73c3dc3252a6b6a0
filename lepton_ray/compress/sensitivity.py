"""Which Linear layers lose the most to int8: ranked on calibration rows of the training split.

Start from the whole int8 model and put back one layer at a time in float32: the layer
whose return brings the outputs closest to the float model's (the largest fall in the mean
KL divergence of the class probabilities) is the most sensitive. One pass per layer, each
at int8 speed; the validation split is not used, since it is what judges the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _log_probs(model, batches: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [
            torch.log_softmax(
                model(**{k: v for k, v in b.items() if k != "labels"}).logits.float(), dim=-1
            )
            for b in batches
        ]


def _kl(reference: list[torch.Tensor], model, batches: Sequence[dict[str, Any]]) -> float:
    """Mean KL(float || model) per row."""
    total, rows = 0.0, 0
    for ref, got in zip(reference, _log_probs(model, batches), strict=True):
        total += float((ref.exp() * (ref - got)).sum())
        rows += len(ref)
    return total / max(rows, 1)


def rank_linears(
    model: torch.nn.Module,
    batches: Sequence[dict[str, Any]],
    keep_float: Sequence[str] = (),
    per_channel: bool = True,
    embeddings: bool = True,
) -> list[tuple[str, float]]:
    """``(name, score)`` for every Linear that int8 would quantize, most sensitive first.

    ``score``: how much the mean KL divergence from the float model falls when that one
    layer stays float32 and every other is int8 (as ``quantize_dynamic_int8`` with the
    same recipe makes them).
    """
    from lepton_ray.compress.formats import quantize_dynamic_int8, quantized_linears
    from lepton_ray.compress.modules import replace_module

    model = model.eval()
    reference = _log_probs(model, batches)
    qmodel = quantize_dynamic_int8(
        model, per_channel=per_channel, keep_float=keep_float, embeddings=embeddings
    )
    base = _kl(reference, qmodel, batches)
    scores = []
    for name, quantized in quantized_linears(qmodel).items():
        replace_module(qmodel, name, model.get_submodule(name))
        scores.append((name, base - _kl(reference, qmodel, batches)))
        replace_module(qmodel, name, quantized)
    return sorted(scores, key=lambda item: -item[1])
