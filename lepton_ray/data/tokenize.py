"""Tokenization as a Ray Data map: one tokenizer per worker process, unpadded ids out."""

from __future__ import annotations

import functools

import pandas as pd


@functools.lru_cache(maxsize=4)
def _tokenizer(model_name: str):
    from lepton_ray.models import load_tokenizer

    return load_tokenizer(model_name)


def tokenize_batch(
    batch: pd.DataFrame, model_name: str, max_length: int, labels: list[str]
) -> pd.DataFrame:
    """Add ``input_ids`` (truncated, unpadded: batches pad on the fly) and ``label_id``."""
    tokenizer = _tokenizer(model_name)
    encoded = tokenizer(list(batch["text"]), truncation=True, max_length=max_length)
    label_index = {label: i for i, label in enumerate(labels)}
    out = batch.copy()
    out["input_ids"] = [
        list(ids) for ids in encoded["input_ids"]
    ]  # arrow list<int>, not a tensor type
    out["label_id"] = [label_index[label] for label in batch["label"]]
    return out
