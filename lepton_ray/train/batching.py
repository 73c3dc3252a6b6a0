"""Training rows in memory and the order they are batched in: plain numpy and torch, no Ray.

A worker holds its share of the tokenized train split as one flat ``int32`` array of token
ids plus offsets (4 bytes a token: SST-2's 63k training rows take about 4 MB). Every epoch's
batch order is a pure function of (seed, epoch, rank), so

- two runs with the same seed see the same batches;
- a run resumed from a checkpoint taken after batch ``k`` of epoch ``e`` continues with
  batch ``k + 1`` of the very same order (nothing is replayed, nothing skipped);
- a Ray Train worker and a bare process (``standalone.py``) given the same rows batch them
  identically.

Length grouping: the epoch's shuffled rows are cut into windows of ``window`` batches,
sorted by token length inside each window, cut into batches, and the batches are shuffled.
Batches then hold texts of similar length (dynamic padding pads little) while their order,
and which texts meet in a batch, stays random from epoch to epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

LENGTH_WINDOW_BATCHES = 64
"""Batches per window sorted by length: wide enough to find similar lengths, narrow
enough that a window still holds a random sample of the epoch."""


@dataclass(frozen=True)
class TokenRows:
    """Token id sequences, stored flat (``ids[offsets[i]:offsets[i+1]]``), and the training
    targets: one per row (a classifier's class id, shape ``(rows,)``) or one row of target
    columns per token (a language model's labels and parts, shape ``(tokens, k)``, stored
    flat like the ids)."""

    ids: np.ndarray
    offsets: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def per_token(self) -> bool:
        return self.targets.ndim == 2

    def targets_of(self, index) -> np.ndarray | list[np.ndarray]:
        """The targets of rows ``index``: values, or per-token arrays (views)."""
        if not self.per_token:
            return self.targets[index]
        return [self.targets[self.offsets[i] : self.offsets[i + 1]] for i in index]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_frames(
        cls, frames: Iterable, target: str | Sequence[str], sort_by_text: bool = True
    ) -> TokenRows:
        """Rows from pandas frames with ``input_ids``, the target column(s) and ``text``.

        ``target``: one column of a value per row, or (a tuple) the per-token list columns
        of a task's ``target_columns``. ``sort_by_text`` puts rows in a canonical order (by
        text, then target), so the order rows arrived in (files, blocks, streaming splits)
        cannot change the batches.
        """
        per_token = not isinstance(target, str)
        seqs: list = []
        labels: list[np.ndarray] = []
        token_targets: list[list] = []
        texts: list = []
        for frame in frames:
            seqs.extend(frame["input_ids"])
            if per_token:
                token_targets.append([frame[c].tolist() for c in target])
            else:
                labels.append(np.asarray(frame[target], dtype=np.int64))
            if sort_by_text and "text" in frame:
                texts.extend(frame["text"])
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.zeros(int(offsets[-1]), dtype=np.int32)
        for i, seq in enumerate(seqs):
            flat[offsets[i] : offsets[i + 1]] = seq
        if per_token:
            label_arr = np.zeros((int(offsets[-1]), len(target)), dtype=np.int32)
            row = 0
            for columns in token_targets:
                for k in range(len(columns[0]) if columns else 0):
                    a, b = offsets[row], offsets[row + 1]
                    for j, column in enumerate(columns):
                        label_arr[a:b, j] = column[k]
                    row += 1
            sort_keys: tuple = ()
        else:
            label_arr = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            sort_keys = (label_arr,)
        rows = cls(flat, offsets, label_arr)
        if sort_by_text and len(texts) == len(seqs) and len(seqs) > 1:
            order = np.lexsort((*sort_keys, np.asarray(texts, dtype=object).astype(str)))
            rows = rows.take(order)
        return rows

    def take(self, index: np.ndarray) -> TokenRows:
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(index):
            gather = np.concatenate(
                [np.arange(self.offsets[i], self.offsets[i + 1]) for i in index]
            )
        else:
            gather = np.zeros(0, dtype=np.int64)
        targets = self.targets[gather] if self.per_token else self.targets[index]
        return TokenRows(self.ids[gather], offsets, targets)

    def shard(self, rank: int, world: int) -> TokenRows:
        """Every ``world``-th row from ``rank``, the same count on every rank (torchrun)."""
        per_rank = len(self) // world
        return self.take(np.arange(rank, per_rank * world, world))

    def refit(self, fn) -> tuple[TokenRows, int, int]:
        """Rows through ``fn(ids, targets) -> (ids, targets) | None`` (None drops the row):
        the new rows, how many came back shorter and how many were dropped."""
        seqs: list[np.ndarray] = []
        kept_targets: list = []
        cut = dropped = 0
        for i in range(len(self)):
            a, b = self.offsets[i], self.offsets[i + 1]
            out = fn(self.ids[a:b], self.targets[a:b] if self.per_token else self.targets[i])
            if out is None:
                dropped += 1
                continue
            cut += len(out[0]) < b - a
            seqs.append(np.asarray(out[0], dtype=self.ids.dtype))
            kept_targets.append(out[1])
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(q) for q in seqs], out=offsets[1:])
        ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=self.ids.dtype)
        if self.per_token:
            width = self.targets.shape[1]
            targets = (
                np.concatenate(kept_targets).astype(self.targets.dtype)
                if seqs
                else np.zeros((0, width), dtype=self.targets.dtype)
            )
        else:
            targets = np.asarray(kept_targets, dtype=self.targets.dtype)
        return TokenRows(ids, offsets, targets), cut, dropped

    def sequences(self, index) -> list[np.ndarray]:
        """The token ids of rows ``index`` (views, no copy), for ``evaluation.collate``."""
        return [self.ids[self.offsets[i] : self.offsets[i + 1]] for i in index]


def epoch_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank])


def epoch_batches(
    rows: TokenRows,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    group_by_length: bool = True,
    window: int = LENGTH_WINDOW_BATCHES,
) -> list[np.ndarray]:
    """Row indices of every batch of one epoch, in order (the last batch may be short)."""
    rng = epoch_rng(seed, epoch, rank)
    order = rng.permutation(len(rows))
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    lengths = rows.lengths
    batches: list[np.ndarray] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = rng.permutation(len(batches))
    return [batches[i] for i in shuffled]


def padding_fraction(rows: TokenRows, batches: list[np.ndarray]) -> float:
    """Share of the padded token slots that hold padding (0 = none wasted)."""
    lengths = rows.lengths
    real = sum(int(lengths[b].sum()) for b in batches)
    slots = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return 1.0 - real / slots if slots else 0.0
