"""How examples pack into rows of a fixed number of tokens (plain numpy): the bins training
packs into (``train/packing.py``) and the real-token share the data report gives."""

from __future__ import annotations

import bisect

import numpy as np


def pack_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Row indices per bin: best-fit decreasing, each bin's rows in their original order."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    free: list[tuple[int, int]] = []  # (room left, bin), kept sorted
    bins: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        if need > capacity:
            raise ValueError(f"a row of {need} tokens does not fit rows of {capacity}")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(int(i))
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    return [sorted(b) for b in bins]


def real_token_share(lengths: np.ndarray, capacity: int) -> dict[str, float]:
    """Share of the token slots that hold real tokens: each example padded to ``capacity``
    (unpacked, fixed-width rows) and packed; and rows before/after."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = int(lengths.sum())
    bins = pack_bins(lengths, capacity) if len(lengths) else []
    return {
        "rows": int(len(lengths)),
        "packed_rows": len(bins),
        "real_share_unpacked": round(real / (len(lengths) * capacity), 4) if len(lengths) else 0.0,
        "real_share_packed": round(real / (len(bins) * capacity), 4) if bins else 0.0,
    }
