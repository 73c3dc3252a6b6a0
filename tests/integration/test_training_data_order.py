"""Training batches mix the classes, even when the input file is sorted by class."""

import pandas as pd
import pytest

from lepton_ray.config import validate_experiment
from lepton_ray.data.pipeline import run_preprocess
from lepton_ray.train.driver import load_train_dataset
from lepton_ray.train.standalone import standalone_batch_rows
from lepton_ray.train.worker import iter_train_frames
from tests.conftest import smoke_config

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


def test_first_batches_of_every_epoch_mix_the_classes_on_one_worker(sorted_by_class):
    cfg, _ = sorted_by_class
    ds = load_train_dataset(cfg)
    firsts = []
    for epoch in range(2):
        frames = iter_train_frames(ds.iterator(), cfg, epoch=epoch, rank=0)
        batches = [list(f["label_id"]) for f, _ in zip(frames, range(4))]
        assert min(_classes_per_batch(batches)) >= 3, batches
        firsts.append(batches[0])
    assert firsts[0] != firsts[1]  # each epoch sees another order


def test_standalone_batches_mix_the_classes_and_reshuffle(sorted_by_class):
    cfg, _ = sorted_by_class
    frame = pd.read_parquet(cfg.data_dir / "train")
    epochs = []
    for epoch in range(2):
        batches = [
            list(frame.iloc[rows]["label_id"])
            for rows, _ in zip(standalone_batch_rows(len(frame), cfg, epoch, 0, 1), range(4))
        ]
        assert min(_classes_per_batch(batches)) >= 3, batches
        epochs.append(batches[0])
    assert epochs[0] != epochs[1]
