"""The replay sample reads the old training split one Parquet row group at a time.

Run in a fresh interpreter (no Ray), so that Arrow's peak allocation is the sample's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_ray.config import validate_experiment
from lepton_ray.data.preprocess import MANIFEST
from tests.conftest import ROOT, smoke_config

PEAK = """
import json, sys
from pathlib import Path
import pyarrow as pa
from lepton_ray.config import validate_experiment
from lepton_ray.registry.retrain import write_replay
cfg = validate_experiment(json.loads(sys.argv[1]), "replay", check_files=False)
rows = write_replay(cfg, ["negative", "positive"], 0.02, Path(sys.argv[2]), seed=5)
print(json.dumps({"rows": rows, "peak": pa.default_memory_pool().max_memory()}))
"""


def _training_split(cfg, files: int, rows: int) -> int:
    """A preprocessed training split of ``files`` one-row-group files; its bytes in memory."""
    folder = cfg.data_dir / "train"
    folder.mkdir(parents=True)
    total = 0
    for f in range(files):
        ids = [list(range(i % 7, i % 7 + 24)) for i in range(rows)]
        table = pa.table(
            {
                "text": [f"file {f} row {i} " + "long words " * 90 for i in range(rows)],
                "label": ["positive" if i % 2 else "negative" for i in range(rows)],
                "label_id": pa.array([i % 2 for i in range(rows)], pa.int64()),
                "input_ids": pa.array(ids, pa.list_(pa.int32())),
                "length": pa.array([24] * rows, pa.int32()),
                "augmented": [False] * rows,
            }
        )
        pq.write_table(table, folder / f"part-{f:05d}.parquet")
        total += table.nbytes
    manifest = {"model": cfg.model.name, "max_length": cfg.data.max_length}
    manifest["labels"] = ["negative", "positive"]
    manifest["splits"] = {"train": files * rows, "validation": 0, "test": 0}
    (cfg.data_dir / MANIFEST).write_text(json.dumps(manifest))
    return total


def test_replay_holds_only_the_sample_and_one_row_group(tmp_path):
    raw = smoke_config(tmp_path, tmp_path / "unused.csv")
    cfg = validate_experiment(raw, "replay", check_files=False)
    split_bytes = _training_split(cfg, files=40, rows=750)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PEAK, json.dumps(raw), str(tmp_path / "replay")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == 600  # 2% of 30,000
    # Reading the whole split would allocate all of it (about 32 MB); a row group is 1/40.
    assert result["peak"] < split_bytes / 4, (result["peak"], split_bytes)
    sample = pd.read_parquet(tmp_path / "replay" / "replay.parquet")
    assert len(sample) == 600 and sample["text"].is_unique
    assert sample["text"].str.startswith("file ").all()
    assert sample["text"].str.extract(r"^file (\d+) ")[0].nunique() == 40  # drawn from all
    assert list(sample.columns) == ["text", "label_id", "input_ids"]
