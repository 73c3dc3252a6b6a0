"""The data report: terminal table, figures, and what lands in an MLflow run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lepton_ray.data.report import (
    MISMATCH,
    OK,
    data_metrics,
    label_distribution_figure,
    length_histogram_figure,
    log_data_report,
    summary_table,
)

FULL = {
    "version": 2,
    "source": "/data/reviews.csv",
    "sources": {"all": "/data/reviews.csv", "validation": "/data/dev.csv"},
    "split_source": "hash",
    "fingerprint": "3f2a9c1e04b7d1e2aa",
    "reused": False,
    "bad_rows": [{"file": "/data/reviews.csv", "line": 12, "error": "expected 2 fields, saw 3"}],
    "labels": ["neg", "pos"],
    "label_map": {"neg": 0, "pos": 1},
    "model": "minilm",
    "max_length": 64,
    "rows_read": 1000,
    "dropped": {
        "empty_text": 3,
        "duplicate": 10,
        "near_duplicate": 4,
        "conflicting_label": 2,
        "too_long": 1,
        "bad_row": 1,
        "contaminated": 0,
    },
    "kept": 979,
    "augmented": 0,
    "splits": {"train": 800, "validation": 90, "test": 89},
    "class_counts": {
        "train": {"neg": 401, "pos": 399},
        "validation": {"neg": 46, "pos": 44},
        "test": {"neg": 43, "pos": 46},
    },
    "masked": {"email": 0, "url": 2, "phone": 0},
    "conflicts": {"texts": 1, "rows": 2},
    "contamination": {"validation": 7, "test": 5, "action": "report"},
    "near_duplicates": {"threshold": 0.8, "cross_split": 6},
    "token_lengths": {
        "edges": [0, 8, 16, 32, 64],
        "counts": {
            "train": [100, 400, 250, 50],
            "validation": [9, 50, 25, 6],
            "test": [10, 44, 30, 5],
        },
        "mean": 12.3,
        "p50": 11,
        "p95": 30,
        "max": 64,
        "truncated": 5,
    },
    "seconds": 12.3,
}

# The keys every manifest has had since the first version; the rest came later.
OLD = {
    "source": "/data/old.tsv",
    "labels": ["0", "1"],
    "rows_read": 120,
    "dropped": {"duplicate": 20},
    "splits": {"train": 80, "validation": 10, "test": 10},
    "class_counts": {
        "train": {"0": 41, "1": 39},
        "validation": {"0": 5, "1": 5},
        "test": {"0": 6, "1": 4},
    },
}


def _row(table: str, first: str) -> list[str]:
    """The cells of the table line whose first cell is ``first``."""
    for line in table.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no line starting with {first!r} in:\n{table}")


# ------------------------------------------------------------------------------------- table
def test_table_shows_counts_reasons_and_identity():
    table = summary_table(FULL)
    assert "/data/reviews.csv" in table and "/data/dev.csv" in table
    assert "3f2a9c1e04b7" in table and "3f2a9c1e04b7d1e2aa" not in table  # shortened
    assert "built now" in table
    assert _row(table, "read")[1] == "1,000"
    assert _row(table, "kept")[1] == "979"
    assert _row(table, "dropped")[1] == "21"
    for reason, n in FULL["dropped"].items():
        assert _row(table, reason)[1] == str(n)
    assert "read = kept + dropped: 1,000 = 979 + 21" in table and OK in table
    assert MISMATCH not in table
    # Splits with classes as columns, and a total row.
    assert _row(table, "split") == ["split", "rows", "neg", "pos"]
    assert _row(table, "train") == ["train", "800", "401", "399"]
    assert _row(table, "validation") == ["validation", "90", "46", "44"]
    assert _row(table, "test") == ["test", "89", "43", "46"]
    assert _row(table, "total") == ["total", "979", "490", "489"]
    # Findings and token lengths.
    assert "url 2" in table
    assert "1 texts (2 rows)" in table
    assert "validation 7, test 5" in table and "action: report" in table
    assert "near-dups across splits  6" in table and "0.8" in table
    assert "malformed rows" in table and ":12" in table
    assert "mean 12.3" in table and "p50 11" in table and "p95 30" in table
    assert "max 64" in table and "truncated 5 (0.5%)" in table


def test_table_columns_line_up():
    lines = summary_table(FULL).splitlines()
    start = lines.index("Splits") + 1
    block = lines[start : start + 6]  # header, rule, 3 splits, total
    assert len({len(line) for line in block}) == 1, block


def test_table_flags_a_mismatch_between_read_and_kept_plus_dropped():
    broken = copy.deepcopy(FULL)
    broken["rows_read"] = 1003
    table = summary_table(broken)
    assert MISMATCH in table
    assert "1,003 ≠ 979 + 21" in table and "off by 3" in table


def test_table_flags_splits_that_do_not_add_up_to_kept():
    broken = copy.deepcopy(FULL)
    broken["splits"]["train"] = 790
    assert "splits = kept + augmented: 969 ≠ 979 + 0" in summary_table(broken)


def test_augmented_rows_count_in_the_splits_not_in_the_identity():
    augmented = copy.deepcopy(FULL)
    augmented["augmented"] = 50
    augmented["splits"]["train"] = 850
    table = summary_table(augmented)
    assert MISMATCH not in table
    assert _row(table, "augmented")[-1] == "50"


def test_old_manifest_without_optional_keys():
    table = summary_table(OLD)
    assert "/data/old.tsv" in table
    assert _row(table, "read")[1] == "120"
    assert _row(table, "kept")[1] == "100"  # derived from the splits
    assert "read = kept + dropped: 120 = 100 + 20" in table and MISMATCH not in table
    assert _row(table, "train") == ["train", "80", "41", "39"]
    for absent in ("fingerprint", "Token lengths", "Checks", "masked", "augmented"):
        assert absent not in table


def test_many_classes_show_the_most_frequent_and_the_rest():
    labels = [f"c{i}" for i in range(12)]
    counts = {label: 10 + i for i, label in enumerate(labels)}  # c11 most frequent
    manifest = {
        "source": "x",
        "labels": labels,
        "rows_read": sum(counts.values()),
        "dropped": {},
        "splits": {"train": sum(counts.values())},
        "class_counts": {"train": counts},
    }
    table = summary_table(manifest)
    header = _row(table, "split")
    assert header[2:7] == ["c11", "c10", "c9", "c8", "c7"]
    assert "…" in header and "c0" not in header
    train = _row(table, "train")
    assert train[2] == "21" and train[-1] == str(sum(10 + i for i in range(7)))
    assert "12 classes" in table


def test_table_survives_odd_values():
    odd = copy.deepcopy(OLD)
    odd["dropped"] = {"duplicate": None}
    odd["class_counts"]["test"] = None
    odd["token_lengths"] = {"mean": None}
    assert "read = kept + dropped" in summary_table(odd)


# ------------------------------------------------------------------------------------ figures
def test_label_distribution_figure_has_a_bar_per_split_and_class():
    import matplotlib.pyplot as plt

    fig = label_distribution_figure(FULL)
    try:
        axes = fig.get_axes()
        assert len(axes) == 2
        for ax in axes:
            assert len(ax.patches) == 3 * 2
        heights = sorted(p.get_height() for p in axes[0].patches)
        assert heights == sorted([401, 399, 46, 44, 43, 46])
        shares = [p.get_height() for p in axes[1].patches]
        assert all(0 <= s <= 1 for s in shares)
    finally:
        plt.close(fig)


def test_length_histogram_figure_has_a_bar_per_split_and_bin():
    import matplotlib.pyplot as plt

    fig = length_histogram_figure(FULL)
    try:
        (ax,) = fig.get_axes()
        assert len(ax.patches) == 3 * 4
        train = [p.get_height() for p in ax.patches[:4]]
        assert train == pytest.approx([100 / 800, 400 / 800, 250 / 800, 50 / 800])
    finally:
        plt.close(fig)


def test_figures_of_an_old_manifest():
    import matplotlib.pyplot as plt

    fig = label_distribution_figure(OLD)
    empty = length_histogram_figure(OLD)
    try:
        assert all(len(ax.patches) == 3 * 2 for ax in fig.get_axes())
        assert not any(ax.patches for ax in empty.get_axes())
    finally:
        plt.close(fig)
        plt.close(empty)


# ------------------------------------------------------------------------------------- MLflow
def test_metrics():
    assert data_metrics(FULL) == {
        "data_rows_read": 1000.0,
        "data_rows_kept": 979.0,
        "data_rows_dropped": 21.0,
        "data_rows_train": 800.0,
        "data_rows_validation": 90.0,
        "data_rows_test": 89.0,
    }


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A private MLflow store in tmp_path; the process's tracking URI is restored after."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment(
        "data-report", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    yield experiment
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # back to the environment, which monkeypatch restores


def test_log_data_report_records_manifest_figures_sample_and_metrics(mlflow_store, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "dropped_sample.jsonl").write_text(
        json.dumps({"reason": "duplicate", "text": "great phone", "label": "pos"}) + "\n"
    )
    with mlflow.start_run(experiment_id=mlflow_store) as run:
        log_data_report(mlflow.get_tracking_uri(), run.info.run_id, FULL, data_dir)
    client = MlflowClient()
    listed = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "data")}
    assert listed == {
        "manifest.json",
        "summary.txt",
        "label_distribution.png",
        "token_lengths.png",
        "dropped_sample.jsonl",
    }
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics == data_metrics(FULL)
    logged = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data/manifest.json")
    assert logged == FULL
    summary = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/summary.txt")
    assert "read = kept + dropped" in summary


def test_log_data_report_of_an_old_manifest_without_sample(mlflow_store, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run(experiment_id=mlflow_store) as run:
        log_data_report(mlflow.get_tracking_uri(), run.info.run_id, OLD, tmp_path / "missing")
    client = MlflowClient()
    listed = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "data")}
    assert listed == {"manifest.json", "summary.txt", "label_distribution.png"}
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["data_rows_kept"] == 100 and metrics["data_rows_dropped"] == 20


def test_log_data_report_into_a_run_by_id_without_an_active_run(mlflow_store, tmp_path):
    """The form the stages use: a client-created run, not the fluent active run."""
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    run_id = client.create_run(mlflow_store).info.run_id
    assert mlflow.active_run() is None
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "dropped_sample.jsonl").write_text('{"reason": "empty_text", "text": ""}\n')
    log_data_report(uri, run_id, FULL, data_dir)
    listed = {a.path for a in client.list_artifacts(run_id, "data")}
    assert {
        "data/manifest.json",
        "data/label_distribution.png",
        "data/token_lengths.png",
        "data/dropped_sample.jsonl",
    } <= listed
    assert client.get_run(run_id).data.metrics == data_metrics(FULL)
