"""Batch order: seeded, complete, resumable, and grouped by length (less padding)."""

import numpy as np
import pandas as pd

from lepton_ray.tasks.classification_eval import collate
from lepton_ray.train.batching import TokenRows, epoch_batches, padding_fraction


def _frame(n=1000, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 60, size=n)
    return pd.DataFrame(
        {
            "text": [f"text {i}" for i in range(n)],
            "input_ids": [list(rng.integers(5, 999, size=k)) for k in lengths],
            "label_id": rng.integers(0, 3, size=n),
        }
    )


def _rows(n=1000, seed=0) -> TokenRows:
    return TokenRows.from_frames([_frame(n, seed)], "label_id")


def test_rows_round_trip_and_canonical_order():
    frame = _frame(50)
    rows = TokenRows.from_frames([frame], "label_id")
    # The order rows arrive in (files, blocks, splits) does not matter: text order.
    backwards = TokenRows.from_frames([frame.iloc[:20], frame.iloc[20:]][::-1], "label_id")
    assert np.array_equal(backwards.ids, rows.ids)
    assert np.array_equal(backwards.targets, rows.targets)
    first = frame.sort_values("text").iloc[0]
    assert rows.ids[: rows.offsets[1]].tolist() == list(first["input_ids"])
    batch = collate(rows.sequences(np.array([0, 1, 2])), rows.targets[:3], pad_id=0)
    lengths = rows.lengths[:3]
    assert batch["input_ids"].shape == (3, lengths.max())
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths.tolist()
    assert batch["labels"].tolist() == rows.targets[:3].tolist()


def test_every_row_once_per_epoch_and_orders_are_seeded():
    rows = _rows()
    for grouped in (False, True):
        a = epoch_batches(rows, 32, seed=1, epoch=0, group_by_length=grouped)
        assert sorted(np.concatenate(a).tolist()) == list(range(len(rows)))
        again = epoch_batches(rows, 32, seed=1, epoch=0, group_by_length=grouped)
        assert all(np.array_equal(x, y) for x, y in zip(a, again))
        next_epoch = epoch_batches(rows, 32, seed=1, epoch=1, group_by_length=grouped)
        other_rank = epoch_batches(rows, 32, seed=1, epoch=0, rank=1, group_by_length=grouped)
        assert not np.array_equal(a[0], next_epoch[0])
        assert not np.array_equal(a[0], other_rank[0])


def test_length_grouping_cuts_padding():
    rows = _rows(4000)
    plain = epoch_batches(rows, 32, seed=0, epoch=0, group_by_length=False)
    grouped = epoch_batches(rows, 32, seed=0, epoch=0, group_by_length=True)
    assert padding_fraction(rows, plain) > 0.3
    assert padding_fraction(rows, grouped) < 0.05
    # Still random: the first batches of two epochs share no rows.
    later = epoch_batches(rows, 32, seed=0, epoch=1, group_by_length=True)
    assert not set(grouped[0]) & set(later[0])


def test_shards_are_equal_and_disjoint():
    rows = _rows(101)
    a, b = rows.shard(0, 2), rows.shard(1, 2)
    assert len(a) == len(b) == 50
    ids_a = {tuple(a.ids[a.offsets[i] : a.offsets[i + 1]]) for i in range(len(a))}
    ids_b = {tuple(b.ids[b.offsets[i] : b.offsets[i + 1]]) for i in range(len(b))}
    assert not ids_a & ids_b


def test_the_readme_describes_the_shuffle_this_module_does():
    """Every epoch a full seeded permutation of the worker's rows (no block order, no
    buffer), grouped by length in windows of LENGTH_WINDOW_BATCHES batches."""
    from lepton_ray.train.batching import LENGTH_WINDOW_BATCHES
    from tests.conftest import ROOT

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "local buffer" not in readme and "block order" not in readme
    assert "full permutation seeded by (seed, epoch, rank)" in readme
    assert f"windows of {LENGTH_WINDOW_BATCHES} batches" in readme
    rows = _rows(300)
    order = np.concatenate(epoch_batches(rows, 8, seed=0, epoch=0, group_by_length=False))
    assert np.array_equal(order, np.random.default_rng([0, 0, 0]).permutation(len(rows)))
