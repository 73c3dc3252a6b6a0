"""Which earlier run the same `lepton-ray train` command resumes, on a real MLflow store."""

from pathlib import Path

from mlflow.tracking import MlflowClient

from lepton_ray.config import validate_experiment
from lepton_ray.tracking.mlflow import TAG_ERROR, ensure_experiment
from lepton_ray.train.driver import TAG_TRAINING_KEY, unfinished_run
from tests.conftest import smoke_config


def test_only_an_interrupted_run_is_resumed_never_a_failed_one(tmp_path):
    cfg = validate_experiment(smoke_config(tmp_path, Path(__file__)))
    c = MlflowClient(cfg.tracking.tracking_uri)
    experiment = ensure_experiment(cfg.tracking, cfg.experiment_name)
    lines: list[str] = []
    started = iter(range(1_000_000, 2_000_000, 1000))  # one second apart: a strict order

    def latest(status: str | None, key: str = "k1") -> str:
        tags = {TAG_TRAINING_KEY: key}
        run_id = c.create_run(experiment, start_time=next(started), tags=tags).info.run_id
        if status == "FAILED":
            c.set_tag(run_id, TAG_ERROR, "TrainingFailed: loss is nan")
        if status is not None:
            c.set_terminated(run_id, status=status)
        return run_id

    assert unfinished_run(cfg, "k1", lines.append) is None  # nothing yet
    killed = latest("KILLED")  # a signal stopped it
    assert unfinished_run(cfg, "k1", lines.append) == killed
    crashed = latest(None)  # the driver died: still RUNNING
    assert unfinished_run(cfg, "k1", lines.append) == crashed
    assert not lines

    failed = latest("FAILED")
    assert unfinished_run(cfg, "k1", lines.append) is None
    assert len(lines) == 1 and failed in lines[0] and "FAILED" in lines[0]
    assert "loss is nan" in lines[0] and "not resumed" in lines[0]

    latest("FINISHED")
    assert unfinished_run(cfg, "k1", lines.append) is None
    other = latest("KILLED", key="k2")  # another key is another training
    assert unfinished_run(cfg, "k2", lines.append) == other
    assert unfinished_run(cfg, "k1", lines.append) is None
