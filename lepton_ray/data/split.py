"""A seeded train/validation/test split decided row by row, and exact-duplicate removal.

Each row's split comes from a keyed hash of its cleaned text compared with the split
fractions, so it needs no task per class and no class in one worker's memory, does not
depend on how Ray partitioned the data, and sends every copy of a text to the same split
(no duplicate leaks from train into evaluation). The split is stratified in expectation:
every class is cut by the same fractions. The same hash, ordered, gives the row order that
is written, so written blocks mix the classes instead of holding one each.
"""

from __future__ import annotations

import hashlib

import pandas as pd

SPLITS = ("train", "validation", "test")
KEY = "_key"
KEY_TEXT = "prompt"
"""Column a task's cleaned rows may add to be split, partitioned and checked for
contamination by (a language model's prompt turns) instead of the whole text."""
"""Column holding the row's 63-bit hash key (split and write order)."""

_SCALE = float(2**63)


def text_key(text: str, seed: int) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") >> 1  # fits in int64


def split_of(key: int, validation: float, test: float) -> str:
    """The split of a row whose hash key is ``key``: test, then validation, then train."""
    u = key / _SCALE
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def assign_split_batch(
    batch: pd.DataFrame, validation: float, test: float, seed: int
) -> pd.DataFrame:
    """Add ``split`` and the hash key to a batch of cleaned ``text``/``label`` rows; keyed
    by :data:`KEY_TEXT` where the task's rows have it (a language model's prompt: every
    example of one prompt lands in one split), else by the text."""
    keyed = batch[KEY_TEXT] if KEY_TEXT in batch else batch["text"]
    keys = [text_key(text, seed) for text in keyed]
    out = batch.copy()
    out[KEY] = pd.Series(keys, index=batch.index, dtype="int64")
    out["split"] = [split_of(k, validation, test) for k in keys]
    return out
