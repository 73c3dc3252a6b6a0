"""The shipped experiments evaluate on text that training never saw."""

from __future__ import annotations

from pathlib import Path

from lepton_ray.config import load_experiment
from tests.conftest import ROOT


def test_sst2_validates_on_dev_sentences_not_on_phrases_cut_from_train():
    # SST-2's train.tsv holds phrases of its own sentences: a split hash-cut from it shares
    # text with training that exact dedup cannot see (near-duplicate removal is off).
    cfg = load_experiment(ROOT / "experiments" / "sst2_minilm_lora.yaml", check_files=False)
    assert Path(cfg.data.path).name == "train.tsv"
    assert not cfg.data.dedup.near.enabled
    assert Path(cfg.data.split.files["validation"]).name == "dev.tsv"
    assert cfg.data.split.hashed_fraction() == 0.0
