"""lepton_ray.explore: the notebooks' views of an experiment, on a real (SQLite) MLflow store."""

from __future__ import annotations

import json

import pytest

from lepton_ray import explore
from lepton_ray.config import validate_experiment
from lepton_ray.errors import LeptonError, StageError
from lepton_ray.tracking.mlflow import (
    TAG_PARENT,
    TAG_STAGE,
    TAG_TRIAL_ID,
    client,
    ensure_experiment,
    log_figure,
    log_metrics,
)
from tests.conftest import ROOT, TINY_LABELS, mlflow_store, register_tiny, smoke_config

DATA = ROOT / "experiments" / "data" / "reviews.csv"


@pytest.fixture
def cfg(tmp_path):
    return validate_experiment(smoke_config(tmp_path, DATA))


@pytest.fixture
def experiment(cfg):
    return ensure_experiment(cfg.tracking, cfg.experiment_name)


def _run(cfg, experiment, name, tags=None, status="FINISHED"):
    c = client(cfg.tracking.tracking_uri)
    run_id = c.create_run(experiment, run_name=name, tags=tags or {}).info.run_id
    if status:
        c.set_terminated(run_id, status=status)
    return run_id


# ---------------------------------------------------------------------------------- paths
def test_project_root_from_the_notebooks_folder_and_from_elsewhere(tmp_path):
    assert explore.project_root(ROOT / "notebooks") == ROOT
    # Outside any checkout: the one this package was imported from (editable install).
    assert explore.project_root(tmp_path) == ROOT


def test_project_root_finds_the_nearest_lepton_ray_checkout(tmp_path, monkeypatch):
    other = tmp_path / "other"
    (other / "lepton_ray").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    checkout = other / "nested"
    (checkout / "lepton_ray").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "lepton-ray"\n')
    (checkout / "notebooks").mkdir()
    assert explore.project_root(checkout / "notebooks") == checkout
    monkeypatch.chdir(checkout / "notebooks")
    assert explore.project_root() == checkout
    # Another project's pyproject is not ours; with no fallback, a clear error.
    monkeypatch.setattr(explore, "__file__", str(tmp_path / "site" / "lepton_ray" / "explore.py"))
    with pytest.raises(LeptonError, match="no lepton-ray checkout"):
        explore.project_root(other)


# ----------------------------------------------------------------------------------- data
def test_manifest_frames():
    manifest = {
        "labels": ["negative", "positive"],
        "splits": {"train": 8, "validation": 2, "test": 0},
        "class_counts": {
            "train": {"negative": 5, "positive": 3},
            "validation": {"negative": 1, "positive": 1},
            "test": {},
        },
        "dropped": {"duplicate": 3, "empty_text": 1, "conflicting_label": 3},
        "rows_read": 17,
        "kept": 10,
        "augmented": 0,
        "reused": True,
    }
    tables = explore.manifest_frames(manifest)
    splits = tables["splits"]
    assert list(splits.columns) == ["rows", "negative", "positive"]
    assert splits.loc["train"].tolist() == [8, 5, 3]
    assert splits.loc["test"].tolist() == [0, 0, 0]
    dropped = tables["dropped"]
    assert list(dropped.index) == ["conflicting_label", "duplicate", "empty_text"]
    assert dropped["rows"].tolist() == [3, 3, 1]
    totals = tables["totals"]
    assert totals["rows_read"] == totals["kept"] + totals["dropped"] == 17
    assert totals["reused"] is True


def test_manifest_frames_with_nothing_dropped():
    tables = explore.manifest_frames({"labels": ["a"], "splits": {"train": 1}, "dropped": {}})
    assert tables["dropped"].empty and tables["totals"]["dropped"] == 0


# ----------------------------------------------------------------------------------- runs
def test_trials_frame_and_sweep_run_id(cfg, experiment):
    uri = cfg.tracking.tracking_uri
    parent = _run(cfg, experiment, "tune", {TAG_STAGE: "tune"})
    other_parent = _run(cfg, experiment, "tune", {TAG_STAGE: "tune"})
    trials = {}
    for trial, lr, rank, best, status in (
        ("t1", "0.001", "4", 0.6, "FINISHED"),
        ("t2", "0.003", "8", 0.8, "FINISHED"),
        ("t3", "0.0005", "4", 0.5, "KILLED"),
    ):
        tags = {
            TAG_PARENT: parent,
            TAG_STAGE: "trial",
            TAG_TRIAL_ID: trial,
            "lepton.param.train.lr": lr,
            "lepton.param.peft.lora.r": rank,
        }
        if status == "KILLED":
            tags["lepton.early_stopped"] = "true"
        run_id = _run(cfg, experiment, f"trial-{trial}", tags, status=status)
        log_metrics(uri, run_id, {"val_accuracy": best - 0.05, "epoch": 1, "val_loss": 0.7}, 1)
        log_metrics(uri, run_id, {f"best_{cfg.tune.metric}": best}, 1)
        trials[trial] = run_id
    # A trial of another sweep, and a run that is not a trial, are not listed.
    _run(cfg, experiment, "trial-x", {TAG_PARENT: other_parent, TAG_STAGE: "trial"})
    _run(cfg, experiment, "compress", {TAG_PARENT: parent, TAG_STAGE: "compress"})

    frame = explore.trials_frame(cfg, parent)
    assert frame["trial_id"].tolist() == ["t2", "t1", "t3"]  # best val_accuracy first
    assert frame["run_id"].tolist() == [trials["t2"], trials["t1"], trials["t3"]]
    assert frame["status"].tolist() == ["FINISHED", "FINISHED", "KILLED"]
    assert frame["early_stopped"].tolist() == [False, False, True]
    assert frame["train.lr"].tolist() == [0.003, 0.001, 0.0005]
    assert frame["peft.lora.r"].tolist() == [8, 4, 4]
    assert frame["best_val_accuracy"].tolist() == [0.8, 0.6, 0.5]
    assert frame["val_accuracy"].round(6).tolist() == [0.75, 0.55, 0.45]
    assert "val_macro_f1" not in frame  # no run logged it
    assert (frame["seconds"] >= 0).all()

    assert explore.sweep_run_id(cfg, trials["t1"]) == parent
    # Without a run: the sweep of the newest trial (another sweep's, here).
    assert explore.sweep_run_id(cfg) == other_parent
    with pytest.raises(StageError, match="not nested"):
        explore.sweep_run_id(cfg, parent)


def test_trials_frame_mode_min(cfg, experiment, tmp_path):
    cfg = validate_experiment(
        smoke_config(tmp_path, DATA, tune={"metric": "val_loss", "mode": "min"})
    )
    uri = cfg.tracking.tracking_uri
    parent = _run(cfg, experiment, "tune", {TAG_STAGE: "tune"})
    for trial, loss in (("a", 0.9), ("b", 0.4)):
        run_id = _run(cfg, experiment, trial, {TAG_PARENT: parent, TAG_STAGE: "trial"})
        log_metrics(uri, run_id, {"best_val_loss": loss}, 1)
    assert explore.trials_frame(cfg, parent)["best_val_loss"].tolist() == [0.4, 0.9]


def test_sweep_run_id_without_trials(cfg, experiment):
    with pytest.raises(StageError, match="no Tune trial"):
        explore.sweep_run_id(cfg)


def test_metric_history_and_evaluations(cfg, experiment):
    uri = cfg.tracking.tracking_uri
    run_id = _run(cfg, experiment, "train", status=None)
    log_metrics(uri, run_id, {"train_rows": 100}, 0)
    for step in (4, 8):
        log_metrics(uri, run_id, {"train_loss_step": 1.0 / step, "lr": 0.1}, step)
    evaluation = {"epoch": 1, "train_loss": 0.7, "val_loss": 0.69, "val_accuracy": 0.5}
    log_metrics(uri, run_id, {**evaluation, "step": 8}, 8)
    log_metrics(uri, run_id, {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "step": 16}, 16)
    log_metrics(uri, run_id, {"val_accuracy": 0.75}, 16)
    log_metrics(uri, run_id, {"val_accuracy": 0.8}, 16)  # logged again: the latest counts

    history = explore.metric_history(cfg, run_id)
    assert list(history.index) == [0, 4, 8, 16]
    assert history.index.name == "step"
    assert history.loc[16, "val_accuracy"] == 0.8
    assert history["val_loss"].isna().tolist() == [True, True, False, False]
    only = explore.metric_history(cfg, run_id, ["val_loss", "epoch"])
    assert list(only.columns) == ["epoch", "val_loss"] and list(only.index) == [8, 16]

    evaluations = explore.evaluation_history(cfg, run_id)
    assert [e["step"] for e in evaluations] == [8.0, 16.0]
    assert evaluations[0]["val_accuracy"] == 0.5 and evaluations[1]["val_accuracy"] == 0.8
    assert "train_rows" not in evaluations[0]
    fig = explore.learning_curves(cfg, run_id)
    assert len(fig.axes) == 2 and fig.axes[0].get_lines()

    empty = _run(cfg, experiment, "empty")
    assert explore.evaluation_history(cfg, empty) == []
    with pytest.raises(StageError, match="no evaluation"):
        explore.learning_curves(cfg, empty)


def test_plot_images_and_show_logged_plots(cfg, experiment, monkeypatch):
    pytest.importorskip("IPython")
    from lepton_ray.tracking import plots

    uri = cfg.tracking.tracking_uri
    run_id = _run(cfg, experiment, "train")
    assert explore.plot_images(cfg, run_id) == {}
    log_figure(
        uri, run_id, plots.confusion_matrix([[3, 1], [0, 4]], TINY_LABELS, "v"), "plots/cm.png"
    )
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9}]
    log_figure(uri, run_id, plots.learning_curves(history), "plots/learning_curves.png")
    client(uri).log_text(run_id, "not a plot", "plots/notes.txt")

    images = explore.plot_images(cfg, run_id)
    assert list(images) == ["plots/cm.png", "plots/learning_curves.png"]
    assert all(data.startswith(b"\x89PNG") for data in images.values())

    shown = []
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    assert explore.show_logged_plots(cfg, run_id, names=["cm.png"]) == ["plots/cm.png"]
    kinds = [type(o).__name__ for o in shown]
    assert kinds == ["Markdown", "Image"]
    assert shown[1].data == images["plots/cm.png"]


# ------------------------------------------------------------------------ registry, eval
@pytest.fixture
def registered(tmp_path, tiny_artifact):
    """A store with two versions of 'reg' (v1 champion), and a config that points at it."""
    from lepton_ray.registry import versions

    store = mlflow_store(tmp_path / "store")
    register_tiny(store, tiny_artifact, 0.7)
    register_tiny(store, tiny_artifact, 0.8, extra_tags={TAG_TRIAL_ID: "t9"})
    versions.promote(store["uri"], "reg", "1", force=True, log=lambda _: None)
    raw = smoke_config(
        tmp_path,
        DATA,
        tracking={"tracking_uri": store["uri"], "registered_model_name": "reg"},
    )
    return validate_experiment(raw)


def test_versions_frame(registered):
    frame = explore.versions_frame(registered)
    assert list(frame.index) == [2, 1]
    assert frame.loc[1, "aliases"] == "@champion" and frame.loc[2, "aliases"] == "@challenger"
    assert frame.loc[2, "trial_id"] == "t9"
    assert frame["val_accuracy"].tolist() == [0.8, 0.7]
    assert frame.loc[2, "quantization"] == "none"
    assert str(frame["created"].dt.tz) == "UTC"


def test_versions_frame_of_a_missing_model(cfg):
    with pytest.raises(StageError, match="no registered model"):
        explore.versions_frame(cfg)


def test_evaluate_version(registered):
    import pandas as pd

    test_dir = registered.data_dir / "test"
    with pytest.raises(StageError, match="no preprocessed 'test' split"):
        explore.evaluate_version(registered, split="test")
    test_dir.mkdir(parents=True)
    manifest = {"model": "minilm", "max_length": 32, "labels": TINY_LABELS}  # the data stage's
    manifest["splits"] = {"train": 0, "validation": 0, "test": 5}
    (registered.data_dir / "manifest.json").write_text(json.dumps(manifest))
    rows = pd.DataFrame(
        {
            "text": ["good", "bad", "fine", "awful", "ok"],
            "label_id": [1, 0, 1, 0, 1],
            "input_ids": [
                [101, 2204, 102],
                [101, 2919, 102],
                [101, 2986, 102],
                [101, 9643, 102],
                [101, 102],
            ],
        }
    )
    rows.to_parquet(test_dir / "part-0.parquet")

    result = explore.evaluate_version(registered, split="test")  # the champion
    assert result["model_uri"] == "models:/reg/1"
    assert result["labels"] == TINY_LABELS
    assert result["metrics"]["examples"] == 5
    assert sum(map(sum, result["confusion"])) == 5
    assert sum(result["confusion"][1]) == 3  # rows: the true label
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert result["probs"].shape == (5, 2) and result["targets"].tolist() == [1, 0, 1, 0, 1]
    other = explore.evaluate_version(registered, "models:/reg@challenger", split="test")
    assert other["model_uri"] == "models:/reg@challenger"
    # Same weights in both versions: same scores.
    assert other["confusion"] == result["confusion"]
