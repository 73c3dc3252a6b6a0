"""Raw texts in, labels and probabilities out, for a loaded model artifact.

The Serve replica and the MLflow pyfunc wrapper of a registered version both answer through
``classify``, so a text gets the same answer from the endpoint and from
``mlflow.pyfunc.load_model("models:/NAME@champion")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def classify(model, tokenizer, meta, texts: Sequence[str]) -> list[dict[str, Any]]:
    """One forward pass over ``texts`` (cleaned and tokenized as in training).

    Each answer: ``label``, ``probabilities`` (label -> probability, rounded to 6 places) and
    ``truncated`` (whether the text was longer than the model's ``max_length``).
    """
    import torch

    from lepton_ray.models import encode_texts

    labels = list(meta.labels)
    encoded, truncated = encode_texts(tokenizer, meta, list(texts))
    with torch.inference_mode():
        probs = torch.softmax(model(**encoded).logits.float(), dim=-1).tolist()
    out = []
    for row, cut in zip(probs, truncated, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        out.append(
            {
                "label": labels[best],
                "probabilities": {label: round(p, 6) for label, p in zip(labels, row)},
                "truncated": bool(cut),
            }
        )
    return out


def classify_batched(
    model, tokenizer, meta, texts: Sequence[str], batch_size: int = 32
) -> list[dict[str, Any]]:
    """``classify`` in batches of ``batch_size`` texts (bounded memory for long lists)."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(texts), batch_size):
        out.extend(classify(model, tokenizer, meta, texts[start : start + batch_size]))
    return out
