"""The shipped SST-2 and TREC experiments' data stage on the real files, checked against the
counts in each SOURCE.md (skipped where ../shared is absent)."""

import json

import pandas as pd
import pytest
import yaml

from lepton_ray.config import validate_experiment
from lepton_ray.data.preprocess import run_preprocess
from tests.conftest import ROOT, shared_file

pytestmark = pytest.mark.usefixtures("ray_session")


def _shipped(name: str, tmp_path, **data):
    raw = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "outputs")
    raw["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    raw["data"].update(data)
    # Paths in the shipped files are relative to the checkout.
    raw["data"]["path"] = str(ROOT / raw["data"]["path"])
    files = raw["data"]["split"].get("files", {})
    raw["data"]["split"]["files"] = {k: str(ROOT / v) for k, v in files.items()}
    return validate_experiment(raw, name)


def _identity(manifest):
    assert manifest["rows_read"] == manifest["kept"] + sum(manifest["dropped"].values())
    assert sum(manifest["splits"].values()) == manifest["kept"] + manifest.get("augmented", 0)


def test_trec_official_test_set_and_counts(tmp_path):
    shared_file("trec", "train.tsv")
    cfg = _shipped("trec_minilm_lora", tmp_path)
    manifest = run_preprocess(cfg, log=lambda _: None)
    # SOURCE.md: 5,452 training questions, 500 test questions.
    assert manifest["rows_read"] == 5452 + 500
    _identity(manifest)
    assert manifest["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert manifest["dropped"].get("duplicate", 0) > 0  # TREC repeats some questions
    # The official test set, whole, with SOURCE.md's coarse label counts.
    test_counts = {"ABBR": 9, "DESC": 138, "ENTY": 94, "HUM": 65, "LOC": 81, "NUM": 113}
    assert manifest["class_counts"]["test"] == test_counts
    assert manifest["splits"]["test"] == 500
    # Validation is cut from train (stratified in expectation, 10% of every class).
    train_counts = {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}
    for label, n_all in train_counts.items():
        n = manifest["class_counts"]["validation"][label]
        assert abs(n - n_all * 0.1) <= max(3.0, 3.5 * (n_all * 0.1 * 0.9) ** 0.5), label
    frame = pd.read_parquet(cfg.data_dir / "test")
    assert frame["input_ids"].map(len).max() <= cfg.data.max_length
    assert (frame["length"] == frame["input_ids"].map(len)).all()


def test_sst2_full_train_with_dev_as_validation(tmp_path):
    shared_file("sst2", "train.tsv")
    cfg = _shipped("sst2_minilm_lora", tmp_path, max_rows=None)
    manifest = run_preprocess(cfg, log=lambda _: None)
    # SOURCE.md: 67,349 train rows (0: 29,780, 1: 37,569) and 872 dev rows (428 / 444);
    # none of the dev sentences appear in train, and 371 train sentences are repeated.
    assert manifest["rows_read"] == 67349 + 872
    _identity(manifest)
    # Validation is the sentence-level dev file, whole; nothing is cut from the phrases.
    assert manifest["class_counts"]["validation"] == {"0": 428, "1": 444}
    assert manifest["contamination"]["validation"] == 0
    assert manifest["splits"]["test"] == 0
    assert (
        manifest["dropped"].get("duplicate", 0) + manifest["dropped"].get("conflicting_label", 0)
        >= 371
    )
    assert manifest["splits"]["train"] == 67349 - sum(manifest["dropped"].values())
    assert manifest["split_source"] == "files"
    print(json.dumps({k: manifest[k] for k in ("dropped", "splits", "seconds")}))
