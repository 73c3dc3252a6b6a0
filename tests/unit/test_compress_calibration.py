"""Calibration rows are a seeded sample read by Parquet row group, and the splits the gate and
compression score on are streamed: the driver never holds a split whole (its memory does not
grow with the split)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_ray.config import validate_experiment
from lepton_ray.data.split_files import open_split
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
elif sys.argv[1] == "stream":
    from lepton_ray.data.split_files import STREAM_ROWS, open_split
    sizes = [len(frame) for frame in open_split(cfg, "train")]
    assert max(sizes) <= STREAM_ROWS, sizes
    rows = sum(sizes)
else:
    from lepton_ray.compress.quantize import _calibration_batches
    batches = _calibration_batches(cfg, types.SimpleNamespace(pad_token_id=0))
    rows = sum(len(b["input_ids"]) for b in batches)
print(json.dumps({"rows": rows, "peak": pa.default_memory_pool().max_memory()}))
"""


def _split(tmp_path: Path, file_rows: int = FILE_ROWS, **compress) -> tuple[dict, object]:
    """A config whose training split is FILES Parquet files of ``file_rows`` rows in row groups
    of GROUP_ROWS; row ``i`` starts with token ``i``."""
    source = tmp_path / "reviews.csv"
    source.write_text("review,sentiment\na,pos\nb,neg\n")
    raw = smoke_config(tmp_path, source, compress={"calibration_rows": SAMPLE, **compress})
    cfg = validate_experiment(raw)
    folder = cfg.data_dir / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(FILES):
        tokens = rng.integers(0, 30_000, size=(file_rows, TOKENS))
        tokens[:, 0] = np.arange(k * file_rows, (k + 1) * file_rows)
        offsets = np.arange(0, file_rows * TOKENS + 1, TOKENS, dtype=np.int32)
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(offsets, tokens.ravel()),
                "label_id": rng.integers(0, 2, size=file_rows),
            }
        )
        pq.write_table(table, folder / f"part-{k:05d}.parquet", row_group_size=GROUP_ROWS)
    manifest = {
        "model": cfg.model.name,
        "max_length": cfg.data.max_length,
        "splits": {"train": FILES * file_rows, "validation": 0, "test": 0},
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
    first = open_split(cfg, "train").sample(SAMPLE, seed=0)
    again = open_split(cfg, "train").sample(SAMPLE, seed=0)
    other = open_split(cfg, "train").sample(SAMPLE, seed=1)
    rows = [int(ids[0]) for ids in first["input_ids"]]
    assert rows == [int(ids[0]) for ids in again["input_ids"]]  # same seed, same rows
    assert rows != [int(ids[0]) for ids in other["input_ids"]]
    assert len(set(rows)) == SAMPLE and rows == sorted(rows)
    assert len({r // FILE_ROWS for r in rows}) == FILES  # drawn from every file
    assert len(first["input_ids"][0]) == TOKENS and set(first.columns) == {"input_ids", "label_id"}
    everything = open_split(cfg, "train").sample(10 * FILES * FILE_ROWS, seed=0)
    assert [int(ids[0]) for ids in everything["input_ids"]] == list(range(FILES * FILE_ROWS))

    (cfg.data_dir / "train" / "part-00003.parquet").unlink()  # a half-copied split
    with pytest.raises(StageError, match="holds 3000 rows but .* counts 4000"):
        open_split(cfg, "train")


def test_a_streamed_split_holds_a_stream_batch_and_a_row_group_not_the_split(tmp_path):
    from lepton_ray.data.split_files import STREAM_ROWS

    file_rows = 8 * STREAM_ROWS
    raw, cfg = _split(tmp_path, file_rows=file_rows)
    whole = _measure("whole", raw)
    streamed = _measure("stream", raw)
    assert streamed["rows"] == whole["rows"] == FILES * file_rows
    held_rows = streamed["peak"] / (whole["peak"] / whole["rows"])
    # A stream batch beside the pages it is decoded from, and its pandas copy.
    assert held_rows <= 3 * (STREAM_ROWS + GROUP_ROWS), (held_rows, streamed, whole)
    # In file and row order, every row once: what the gate and compression score on.
    firsts = [int(ids[0]) for frame in open_split(cfg, "train") for ids in frame["input_ids"]]
    assert firsts == list(range(FILES * file_rows))
