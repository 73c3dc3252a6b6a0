"""Packing: short examples share rows of ``max_length`` tokens (plain numpy, no Ray).

Rows are filled best-fit decreasing (each example, longest first, goes to the row it fills
most tightly), so few token slots are left empty. A packed row keeps its examples apart: its
per-token targets gain a third column, each token's position in its own example, which
restarts at 0 at every example; collation turns those into restarting ``position_ids`` and
a block-diagonal attention mask (``tasks/causal_lm_eval.py``), and no label is predicted
from another example's tokens.
"""

from __future__ import annotations

import numpy as np

from lepton_ray.data.packing_stats import pack_bins
from lepton_ray.train.batching import TokenRows


def pack_rows(rows: TokenRows, capacity: int) -> TokenRows:
    """``rows`` (per-token targets) packed into rows of at most ``capacity`` tokens."""
    if not rows.per_token:
        raise ValueError("packing needs per-token targets (a language model's rows)")
    bins = pack_bins(rows.lengths, capacity)
    order = [i for b in bins for i in b]
    packed = rows.take(np.asarray(order, dtype=np.int64))
    positions = np.concatenate(
        [np.arange(n, dtype=np.int32) for n in rows.lengths[order]] or [np.zeros(0, np.int32)]
    )
    sizes = np.array([sum(int(rows.lengths[i]) for i in b) for b in bins], dtype=np.int64)
    offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    targets = np.concatenate([packed.targets, positions[:, None]], axis=1)
    return TokenRows(packed.ids, offsets, targets)
