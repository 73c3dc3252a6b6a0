"""Token-level augmentation of the training split: seeded random word deletion and swaps.

No synonyms, no models: an augmented copy of a text is the text with some words deleted and
some neighbouring words swapped. Every copy's random stream and new key are derived from
``(seed, the row's key, the copy index)`` alone, so the augmented rows do not depend on how
Ray batched or partitioned the data, nor on row order.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Protocol

import numpy as np
import pandas as pd
from pandas.api.types import is_string_dtype

from lepton_ray.data.split import KEY


class _Random(Protocol):
    def random(self) -> float: ...


AUGMENTED = "augmented"
"""Bool column that marks augmented rows (True on every row ``augment_batch`` returns)."""


def augment_text(text: str, *, deletion_rate: float, swap_rate: float, rng: _Random) -> str:
    """One augmented copy of ``text`` (words are whitespace-separated tokens).

    1. Deletion: each word is dropped with probability ``deletion_rate``; if that would drop
       every word, one of them, chosen at random, stays.
    2. Swaps: ``round(swap_rate * n)`` times (halves round up; ``n`` counts the words left
       after deletion) a random word trades places with its right-hand neighbour. Adjacent
       swaps perturb local word order while keeping the sentence's overall shape.

    ``rng`` is anything with a ``random()`` method returning floats in [0, 1): a
    ``random.Random`` (what :func:`augment_batch` uses) or a ``numpy.random.Generator``.
    The words are joined with single spaces. A text of fewer than two words comes back as
    it is.
    """
    _check_rates(deletion_rate, swap_rate)
    words = text.split()
    if len(words) < 2:
        return text
    return " ".join(_augment_words(words, deletion_rate, swap_rate, rng))


def _augment_words(
    words: list[str], deletion_rate: float, swap_rate: float, rng: _Random
) -> list[str]:
    """augment_text on a list of at least two words (the list is not changed)."""
    n = len(words)
    if deletion_rate >= 1:
        words = [words[min(int(rng.random() * n), n - 1)]]
    elif deletion_rate > 0:
        # Each word goes with probability p, drawn as geometric gaps between deleted words
        # (the same distribution, one draw per deletion instead of one per word).
        log_keep = math.log1p(-deletion_rate)
        kept: list[str] = []
        start = 0
        while True:
            gap = math.log(1.0 - rng.random()) / log_keep  # 1 - random() is in (0, 1]
            if gap >= n - start:
                break
            deleted = start + int(gap)
            kept += words[start:deleted]
            start = deleted + 1
        kept += words[start:]
        words = kept or [words[min(int(rng.random() * n), n - 1)]]
    else:
        words = list(words)
    n = len(words)
    if n >= 2:
        for _ in range(int(swap_rate * n + 0.5)):
            i = min(int(rng.random() * (n - 1)), n - 2)
            words[i], words[i + 1] = words[i + 1], words[i]
    return words


def augment_batch(
    batch: pd.DataFrame, *, copies: int, deletion_rate: float, swap_rate: float, seed: int
) -> pd.DataFrame:
    """The augmented rows for a batch of training rows (the input rows are not included).

    ``batch`` has ``text``, ``label`` and ``_key`` (int64) columns, and maybe more, which are
    carried over unchanged. Each row with at least two words yields up to ``copies`` rows:
    a copy is skipped when its text is empty, equals the original or equals an earlier copy
    of the same row. Each kept copy gets a new ``_key``, a non-negative int64 hashed (BLAKE2b)
    from ``(seed, original key, copy index)``, and ``augmented`` = True. The result does not
    depend on how rows are batched: augmenting a frame or its pieces gives the same rows.
    """
    _check_rates(deletion_rate, swap_rate)
    if int(copies) != copies or copies < 0:
        raise ValueError(f"copies must be a non-negative integer, got {copies!r}")
    positions: list[int] = []
    texts: list[str] = []
    keys: list[int] = []
    if copies and (deletion_rate > 0 or swap_rate > 0):
        rng = random.Random()
        rows = zip(batch["text"].tolist(), batch[KEY].tolist(), strict=True)
        for pos, (text, key) in enumerate(rows):
            words = text.split() if isinstance(text, str) else []
            if len(words) < 2:
                continue
            seen = {text, " ".join(words)}  # unchanged, even where the spacing differs
            for copy in range(int(copies)):
                rng_seed, new_key = _derive(seed, int(key), copy)
                rng.seed(rng_seed)  # each copy's stream depends on the copy alone
                new = " ".join(_augment_words(words, deletion_rate, swap_rate, rng))
                if not new or new in seen:
                    continue
                seen.add(new)
                positions.append(pos)
                texts.append(new)
                keys.append(new_key)
    out = batch.iloc[positions].reset_index(drop=True)
    if texts:
        dtype = batch["text"].dtype
        out["text"] = pd.Series(texts, dtype=dtype if is_string_dtype(dtype) else None)
    out[KEY] = np.asarray(keys, dtype=np.int64)
    out[AUGMENTED] = np.ones(len(out), dtype=bool)
    return out


def _derive(seed: int, key: int, copy: int) -> tuple[int, int]:
    """The random seed and the new 63-bit key of copy ``copy`` of the row keyed ``key``."""
    digest = hashlib.blake2b(
        f"{seed}:{key}:{copy}".encode(), digest_size=16, person=b"lepton-augment"
    ).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big") >> 1


def _check_rates(deletion_rate: float, swap_rate: float) -> None:
    if not 0.0 <= deletion_rate <= 1.0:
        raise ValueError(f"deletion_rate must be in [0, 1], got {deletion_rate!r}")
    if not 0.0 <= swap_rate <= 1.0:
        raise ValueError(f"swap_rate must be in [0, 1], got {swap_rate!r}")
