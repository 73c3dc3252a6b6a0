"""Training batches mix the classes, even when the input file is sorted by class."""

import numpy as np
import pandas as pd
import pytest

from lepton_ray.config import validate_experiment
from lepton_ray.data.preprocess import run_preprocess
from lepton_ray.tasks import get_task
from lepton_ray.train.batching import epoch_batches
from lepton_ray.train.driver import load_split_dataset
from lepton_ray.train.recipe import read_split
from lepton_ray.train.worker import shard_rows
from tests.conftest import smoke_config

TARGET = get_task("sequence_classification").target_column

pytestmark = pytest.mark.slow
LABELS = ["animal", "city", "number", "person"]


@pytest.fixture(scope="module")
def sorted_by_class(tmp_path_factory, ray_session):
    """A 4-class dataset written class after class, preprocessed by the data stage."""
    tmp = tmp_path_factory.mktemp("order")
    rows = [
        (f"question {i} about a {label} number {i * 7 % 13}", label)
        for label in LABELS
        for i in range(150)
    ]
    path = tmp / "sorted.csv"
    pd.DataFrame(rows, columns=["review", "sentiment"]).to_csv(path, index=False)
    raw = smoke_config(tmp, path, train={"batch_size": 16, "epochs": 2})
    cfg = validate_experiment(raw)
    manifest = run_preprocess(cfg, log=lambda _: None)
    return cfg, manifest


def _classes_per_batch(label_ids_per_batch) -> list[int]:
    return [len(set(ids)) for ids in label_ids_per_batch]


def test_written_train_blocks_mix_the_classes(sorted_by_class):
    cfg, manifest = sorted_by_class
    assert manifest["splits"]["train"] > 300
    for file in sorted((cfg.data_dir / "train").glob("*.parquet")):
        frame = pd.read_parquet(file)
        if len(frame) >= 32:
            assert frame["label_id"].nunique() == 4, file.name


def _first_batches(rows, cfg, epoch: int, rank: int = 0, n: int = 4):
    batches = epoch_batches(rows, cfg.train.batch_size, cfg.train.seed, epoch, rank)
    return [rows.targets[b].tolist() for b in batches[:n]]


def test_worker_batches_mix_the_classes_and_reshuffle_every_epoch(sorted_by_class):
    """What a Ray Train worker trains on: its shard from Ray Data, in a seeded order."""
    cfg, _ = sorted_by_class
    rows = shard_rows(load_split_dataset(cfg, "train").iterator(), TARGET)
    firsts = []
    for epoch in range(2):
        batches = _first_batches(rows, cfg, epoch)
        assert min(_classes_per_batch(batches)) >= 3, batches
        firsts.append(batches[0])
    assert firsts[0] != firsts[1]  # each epoch sees another order


def test_ray_data_and_the_bare_loop_hand_over_the_same_rows(sorted_by_class):
    """Through Ray Data or read from the folder, in any block order: the same rows, in
    the same canonical order, so both paths train on identical batches."""
    cfg, _ = sorted_by_class
    via_ray = shard_rows(load_split_dataset(cfg, "train").iterator(), TARGET)
    again = shard_rows(load_split_dataset(cfg, "train", block_rows=37).iterator(), TARGET)
    bare = read_split(cfg, "train")
    for other in (again, bare):
        assert np.array_equal(via_ray.ids, other.ids)
        assert np.array_equal(via_ray.targets, other.targets)


def test_two_workers_get_equal_disjoint_shards_every_time(sorted_by_class):
    cfg, manifest = sorted_by_class

    import threading

    def read(its):
        out = [None, None]

        def one(i):
            out[i] = shard_rows(its[i], TARGET)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    runs = []
    for _ in range(2):
        ds = load_split_dataset(cfg, "train")
        runs.append(read(ds.streaming_split(2, equal=True)))
    a, b = runs[0]
    assert len(a) == len(b) >= manifest["splits"]["train"] // 2 - 1
    for first, second in zip(runs[0], runs[1]):  # the same split on a second execution
        assert np.array_equal(first.ids, second.ids)
