"""Calibration rows are a seeded sample read by Parquet row group: compress never holds the
training split whole (the driver's memory does not grow with the split)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_ray.compress.calibration import sample_split
from lepton_ray.config import validate_experiment
from lepton_ray.errors import StageError
from tests.conftest import ROOT, smoke_config

FILES, FILE_ROWS, GROUP_ROWS, TOKENS = 4, 1000, 50, 256
"""The training split: 4 files of 1,000 rows in row groups of 50, 256 tokens a row."""
SAMPLE = 64

MEASURE = """
import json, sys, types
import pyarrow as pa
from lepton_ray.config import validate_experiment
cfg = validate_experiment(json.loads(sys.argv[2]))
if sys.argv[1] == "whole":
    import pandas as pd
    rows = len(pd.read_parquet(cfg.data_dir / "train"))
else:
    from lepton_ray.compress.quantize import _calibration_batches
    batches = _calibration_batches(cfg, types.SimpleNamespace(pad_token_id=0))
    rows = sum(len(b["input_ids"]) for b in batches)
print(json.dumps({"rows": rows, "peak": pa.default_memory_pool().max_memory()}))
"""


def _split(tmp_path: Path, **compress) -> tuple[dict, object]:
    """A config whose training split is FILES Parquet files; row ``i`` starts with token ``i``."""
    source = tmp_path / "reviews.csv"
    source.write_text("review,sentiment\na,pos\nb,neg\n")
    raw = smoke_config(tmp_path, source, compress={"calibration_rows": SAMPLE, **compress})
    cfg = validate_experiment(raw)
    folder = cfg.data_dir / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(FILES):
        tokens = rng.integers(0, 30_000, size=(FILE_ROWS, TOKENS))
        tokens[:, 0] = np.arange(k * FILE_ROWS, (k + 1) * FILE_ROWS)
        offsets = np.arange(0, FILE_ROWS * TOKENS + 1, TOKENS, dtype=np.int32)
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(offsets, tokens.ravel()),
                "label_id": rng.integers(0, 2, size=FILE_ROWS),
            }
        )
        pq.write_table(table, folder / f"part-{k:05d}.parquet", row_group_size=GROUP_ROWS)
    manifest = {
        "model": cfg.model.name,
        "max_length": cfg.data.max_length,
        "splits": {"train": FILES * FILE_ROWS, "validation": 0, "test": 0},
    }
    (cfg.data_dir / "manifest.json").write_text(json.dumps(manifest))
    return raw, cfg


def _measure(what: str, raw: dict) -> dict:
    """Rows and peak Arrow memory of one read, in a fresh interpreter (a clean peak)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, what, json.dumps(raw)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_calibration_materializes_the_sample_and_a_row_group_not_the_split(tmp_path):
    raw, _ = _split(tmp_path)
    whole = _measure("whole", raw)  # what reading the split whole holds
    sample = _measure("calibration", raw)
    assert whole["rows"] == FILES * FILE_ROWS and sample["rows"] == SAMPLE
    bytes_per_row = whole["peak"] / whole["rows"]
    held_rows = sample["peak"] / bytes_per_row
    # The sample plus the one row group being decoded, each at most twice (a row group is
    # decoded beside its pages; the sample is converted to pandas from Arrow).
    assert held_rows <= 2 * (SAMPLE + GROUP_ROWS), (held_rows, sample, whole)


def test_the_sample_is_seeded_distinct_and_checked_against_the_manifest(tmp_path):
    _, cfg = _split(tmp_path)
    first = sample_split(cfg, "train", SAMPLE, seed=0)
    again = sample_split(cfg, "train", SAMPLE, seed=0)
    other = sample_split(cfg, "train", SAMPLE, seed=1)
    rows = [int(ids[0]) for ids in first["input_ids"]]
    assert rows == [int(ids[0]) for ids in again["input_ids"]]  # same seed, same rows
    assert rows != [int(ids[0]) for ids in other["input_ids"]]
    assert len(set(rows)) == SAMPLE and rows == sorted(rows)
    assert len({r // FILE_ROWS for r in rows}) == FILES  # drawn from every file
    assert len(first["input_ids"][0]) == TOKENS and set(first.columns) == {"input_ids", "label_id"}
    everything = sample_split(cfg, "train", 10 * FILES * FILE_ROWS, seed=0)
    assert [int(ids[0]) for ids in everything["input_ids"]] == list(range(FILES * FILE_ROWS))

    (cfg.data_dir / "train" / "part-00003.parquet").unlink()  # a half-copied split
    with pytest.raises(StageError, match="holds 3000 rows but .* counts 4000"):
        sample_split(cfg, "train", SAMPLE, seed=0)
