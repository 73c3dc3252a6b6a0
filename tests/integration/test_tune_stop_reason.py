"""A sweep says who stopped a trial early: its scheduler (here the median stopping rule),
or the trial's own early stopping."""

import pytest
from mlflow.tracking import MlflowClient

from lepton_ray.config import validate_experiment
from lepton_ray.data.preprocess import run_preprocess
from lepton_ray.data.sample import write_reviews_csv
from tests.conftest import smoke_config

pytestmark = pytest.mark.slow


def test_a_trial_that_stopped_itself_is_not_reported_as_stopped_by_its_scheduler(
    tmp_path, ray_session
):
    from lepton_ray.tracking.mlflow import tracked_run
    from lepton_ray.tune.driver import run_tune
    from lepton_ray.tune.report import TAG_STOPPED_BY

    data = write_reviews_csv(tmp_path / "reviews.csv", n=200, seed=5)
    raw = smoke_config(
        tmp_path,
        data,
        # lr 1e-9: nothing improves after the first evaluation, so patience 1 stops the
        # trial after epoch 2 of 3. The median rule, with one trial, has nobody to compare
        # it with.
        train={"epochs": 3, "lr": 1e-9, "warmup_ratio": 0.0, "early_stopping": {"patience": 1}},
        scaling={"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        tune={
            "enabled": True,
            "num_samples": 1,
            "scheduler": {"type": "median", "min_samples_required": 1},
            "space": {"train.lr": {"type": "choice", "values": [1e-9]}},
        },
    )
    cfg = validate_experiment(raw)
    manifest = run_preprocess(cfg, log=lambda _: None)
    lines: list[str] = []
    with tracked_run(cfg, "tune") as parent:
        result = run_tune(cfg, manifest, parent, log=lines.append)

    (trial,) = result["trials"]
    assert trial["metrics"]["epochs"] == 2
    assert trial["early_stopped"] and trial["stopped_by"] == "early_stopping"
    (line,) = [line for line in lines if line.startswith(f"[tune] trial {trial['trial_id']}:")]
    assert "stopped early by its own early stopping" in line and "median" not in line, line
    assert any("+ median" in line for line in lines), lines  # the sweep ran the median rule
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(trial["run_id"])
    assert run.data.tags[TAG_STOPPED_BY] == "early_stopping"
    assert run.data.tags["lepton.early_stopped"] == "true"
    assert run.info.status == "FINISHED"  # it ended by itself: a scheduler's stops are KILLED
