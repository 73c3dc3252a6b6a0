"""Ray Data preprocessing on the real TREC and SST-2 files (skipped where ../shared is absent)."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from lepton_ray.cli import app
from tests.conftest import shared_file, smoke_config, write_yaml

runner = CliRunner()


@pytest.mark.usefixtures("ray_session")
def test_trec_tsv_six_classes_stratified(tmp_path):
    trec = shared_file("trec", "train.tsv")
    raw = smoke_config(
        tmp_path,
        trec,
        data={
            "text_column": "text",
            "label_column": "coarse_label",
            "split": {"validation": 0.1, "test": 0.1, "seed": 5},
        },
    )
    path = write_yaml(tmp_path / "trec.yaml", raw)
    result = runner.invoke(app, ["preprocess", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "outputs" / "smoke" / "data"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert manifest["rows_read"] == 5452
    kept = sum(manifest["splits"].values())
    assert kept + sum(manifest["dropped"].values()) == 5452
    assert manifest["dropped"].get("duplicate", 0) > 0  # TREC repeats some questions
    # Stratified in expectation (a per-row hash decides): every class keeps its 10% share
    # in validation and test within 3.5 binomial standard deviations, and no class is lost.
    for split in ("validation", "test"):
        for label in manifest["labels"]:
            n_all = sum(
                manifest["class_counts"][s].get(label, 0) for s in ("train", "validation", "test")
            )
            n = manifest["class_counts"][split].get(label, 0)
            assert abs(n - n_all * 0.1) <= max(3.0, 3.5 * (n_all * 0.1 * 0.9) ** 0.5), label
            assert manifest["class_counts"]["train"][label] > 0.7 * n_all, label
    frame = pd.read_parquet(out / "validation")
    assert set(frame.columns) >= {"text", "label", "input_ids", "label_id"}
    assert frame["input_ids"].map(len).max() <= raw["data"]["max_length"]
    assert len(frame) == manifest["splits"]["validation"]


@pytest.mark.usefixtures("ray_session")
def test_sst2_is_deterministic_across_runs(tmp_path):
    sst = shared_file("sst2", "dev.tsv")
    raw = smoke_config(tmp_path, sst, data={"text_column": "sentence", "label_column": "label"})
    path = write_yaml(tmp_path / "sst.yaml", raw)
    out = tmp_path / "outputs" / "smoke" / "data"
    splits = []
    for _ in range(2):
        assert runner.invoke(app, ["preprocess", str(path)]).exit_code == 0
        frame = pd.read_parquet(out / "test")
        splits.append(sorted(frame["text"]))
    assert splits[0] == splits[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == ["0", "1"]
    assert sum(manifest["splits"].values()) + sum(manifest["dropped"].values()) == 872
