"""The data stage on a simulated two-node Ray cluster writes what one node writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from lepton_ray.config import validate_experiment
from lepton_ray.data.preprocess import run_preprocess
from tests.conftest import ROOT, smoke_config
from tests.integration.test_data_stage import _dirty_rows, _write_csv

pytestmark = pytest.mark.usefixtures("ray_session")

TWO_NODES = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from lepton_ray.config import validate_experiment
    from lepton_ray.data.preprocess import run_preprocess

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    raw = json.loads(sys.argv[1])
    run_preprocess(validate_experiment(raw, "two-nodes"), log=lambda _: None, force=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


def _rows(folder) -> pd.DataFrame:
    frames = []
    for split in ("train", "validation", "test"):
        frame = pd.read_parquet(folder / split).assign(split=split)
        frame["input_ids"] = frame["input_ids"].map(tuple)
        frames.append(frame)
    cols = ["split", "text", "label", "label_id", "input_ids", "length", "augmented"]
    return pd.concat(frames)[cols].sort_values(cols[:3]).reset_index(drop=True)


def test_two_node_output_matches_one_node(tmp_path):
    import json

    rows, _ = _dirty_rows(7)
    path = _write_csv(tmp_path / "dirty.csv", rows)
    data = {
        "split": {"validation": 0.2, "test": 0.2},
        "clean": {"strip_html": True, "mask_pii": ["email", "url"]},
        "dedup": {"near": {"enabled": True, "threshold": 0.9}},
        "augment": {"enabled": True},
    }
    one = smoke_config(tmp_path / "one", path, data=data)
    two = smoke_config(tmp_path / "two", path, data=data)
    single = run_preprocess(validate_experiment(one, "one"), log=lambda _: None)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    done = subprocess.run(
        [sys.executable, "-c", TWO_NODES, json.dumps(two)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out_one = tmp_path / "one" / "storage" / "smoke" / "data"
    out_two = tmp_path / "two" / "storage" / "smoke" / "data"
    double = json.loads((out_two / "manifest.json").read_text())
    for key in (
        "rows_read",
        "kept",
        "dropped",
        "splits",
        "class_counts",
        "augmented",
        "fingerprint",
    ):
        assert double[key] == single[key], key
    pd.testing.assert_frame_equal(_rows(out_one), _rows(out_two))
