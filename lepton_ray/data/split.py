"""Exact-duplicate removal and a seeded, stratified train/validation/test split.

Both work on one label's rows at a time (``groupby(label).map_groups``), and order rows by a
seeded hash of their text, so the result does not depend on how Ray partitioned the data.
"""

from __future__ import annotations

import hashlib

import pandas as pd

DUPLICATE = "duplicate"
SPLITS = ("train", "validation", "test")


def text_key(text: str, seed: int) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") >> 1  # fits in int64


def split_sizes(n: int, validation: float, test: float) -> tuple[int, int, int]:
    """Rows per split for a class of ``n`` rows; train always keeps at least one row."""
    n_test = round(n * test)
    n_val = round(n * validation)
    while n_test + n_val >= n and (n_test or n_val):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def assign_splits(
    group: pd.DataFrame, validation: float, test: float, seed: int, dedup: bool
) -> pd.DataFrame:
    """Add a ``split`` column to one label's rows: train, validation, test or duplicate."""
    group = group.copy()
    group["_key"] = [text_key(t, seed) for t in group["text"]]
    group = group.sort_values(["_key", "text"], kind="stable").reset_index(drop=True)
    split = pd.Series([DUPLICATE] * len(group), dtype=object)
    unique_mask = (
        ~group["text"].duplicated(keep="first") if dedup else pd.Series(True, index=group.index)
    )
    unique_idx = group.index[unique_mask]
    n_train, n_val, n_test = split_sizes(len(unique_idx), validation, test)
    split[unique_idx[:n_test]] = "test"
    split[unique_idx[n_test : n_test + n_val]] = "validation"
    split[unique_idx[n_test + n_val :]] = "train"
    group["split"] = split.values
    return group.drop(columns=["_key"])
