"""Ray Train around the plain loop: the same results as the bare loop, FSDP, failures, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.compress.formats import load_model_artifact
from lepton_ray.config import validate_experiment
from lepton_ray.data.preprocess import run_preprocess
from lepton_ray.data.sample import write_reviews_csv
from tests.conftest import ROOT, smoke_config, write_yaml

pytestmark = pytest.mark.slow
runner = CliRunner()
QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("core")
    path = write_reviews_csv(tmp / "reviews.csv", n=400, seed=11)
    return tmp, path


def _cfg(tmp: Path, data: Path, name: str, **train):
    settings = {
        "epochs": 2,
        "batch_size": 8,
        "lr": 3e-3,
        "max_steps_per_epoch": None,
        "eval_every_steps": 6,
        "precision": "fp32",
        **train,
    }
    raw = smoke_config(tmp / name, data, name=name, train=settings)
    raw["output_dir"] = str(tmp / "shared-outputs")  # one preprocessed copy for every test
    return raw


def _prepared(raw):
    cfg = validate_experiment(raw)
    return cfg, run_preprocess(cfg, **QUIET)


def _final(result) -> dict:
    return result["metrics"]


def test_ray_worker_gives_the_bare_loops_results(data):
    """1 Ray Train worker and the loop in this process: same rows, order and numbers."""
    from lepton_ray.train.driver import run_train
    from lepton_ray.train.standalone import train_standalone

    tmp, path = data
    raw = _cfg(tmp, path, "same", max_steps_per_epoch=10)
    raw["scaling"] = {"num_workers": 1, "resources_per_worker": {"CPU": 1}}
    cfg, manifest = _prepared(raw)
    ray_result = run_train(cfg, manifest, **QUIET)
    bare = train_standalone(cfg, manifest, tmp / "bare", **QUIET)["history"][-1]
    assert ray_result["metrics"]["step"] == bare["step"] == 20
    assert ray_result["metrics"]["val_loss"] == pytest.approx(bare["val_loss"], abs=1e-5)
    assert ray_result["metrics"]["val_accuracy"] == bare["val_accuracy"]


@pytest.fixture(scope="module")
def ddp_run(data):
    """An uninterrupted 2-worker DDP run: the reference for the fault-tolerance tests."""
    from lepton_ray.train.driver import run_train

    tmp, path = data
    cfg, manifest = _prepared(_cfg(tmp, path, "reference"))
    return cfg, manifest, run_train(cfg, manifest, **QUIET)


def test_ddp_reports_every_metric_and_logs_the_pictures(ddp_run):
    cfg, _, result = ddp_run
    metrics = result["metrics"]
    for key in ("val_accuracy", "val_macro_f1", "val_roc_auc", "train_tokens_per_s", "step"):
        assert key in metrics, key
    c = MlflowClient(cfg.tracking.tracking_uri)
    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss_step")][:2] == [
        10,
        20,
    ]
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "val_loss")]
    assert steps == sorted(steps) and len(steps) >= 5  # every 6 steps and every epoch end
    pictures = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert {
        "plots/learning_curves.png",
        "plots/confusion_matrix_val.png",
        "plots/roc_curve_val.png",
    } <= pictures


def test_fsdp_with_lora_matches_ddp(data, ddp_run):
    from lepton_ray.train.driver import run_train

    tmp, path = data
    reference_cfg, _, reference = ddp_run
    cfg, manifest = _prepared(
        _cfg(tmp, path, "fsdp", strategy="fsdp", fsdp_min_params_per_worker=1000)
    )
    result = run_train(cfg, manifest, **QUIET)

    # Sharded or replicated, it is the same optimisation (up to float summation order): the
    # whole validation curve matches, evaluation for evaluation. (Not the best checkpoint's
    # step: on this near-chance task a last-digit difference can move an accuracy tie.)
    def curve(config, run_id):
        history = MlflowClient(config.tracking.tracking_uri).get_metric_history(run_id, "val_loss")
        return sorted((m.step, m.value) for m in history)

    ours = curve(cfg, result["run_id"])
    theirs = curve(reference_cfg, reference["run_id"])
    assert [s for s, _ in ours] == [s for s, _ in theirs] and len(ours) >= 5
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], abs=2e-3)
    with result["checkpoint"].as_directory() as folder:
        model, _, meta = load_model_artifact(Path(folder))
        assert meta.peft_method == "lora"


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return sorted(a.pid for a in actors if "RayTrainWorker" in (a.class_name or ""))


def _checkpoint_registered(storage: Path) -> bool:
    """Ray Train has recorded a checkpoint (its manager's snapshot names one), so a restart
    restores it; a checkpoint folder alone may still be on its way to the controller."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):
            continue  # being written
    return False


def _assert_restored_not_retrained(client, run_id: str, final_step: int) -> int:
    """The run went on from a checkpoint: it logged the step it restored (once), and no
    step up to there was trained or evaluated twice, as a retrain from scratch would (its
    numbers are the same, training being deterministic; its logged steps are not)."""
    from lepton_ray.train.recipe import RESUMED_AT_STEP

    restores = client.get_metric_history(run_id, RESUMED_AT_STEP)
    assert len(restores) == 1, restores
    start = int(restores[0].value)
    assert restores[0].step == start and 0 < start < final_step, start
    evaluated = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert start in evaluated  # checkpoints are written at evaluations
    for key in ("val_loss", "train_loss_step"):
        before = [m.step for m in client.get_metric_history(run_id, key) if m.step <= start]
        assert len(before) == len(set(before)), (key, sorted(before))
    return start


def test_a_killed_worker_is_replaced_and_the_run_ends_as_if_nothing_happened(data, ddp_run):
    from lepton_ray.train.driver import run_train

    tmp, path = data
    ref_cfg, _, reference = ddp_run
    cfg, manifest = _prepared(_cfg(tmp, path, "killed", max_failures=2))
    storage = cfg.checkpoint_root
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline:
            if _checkpoint_registered(storage):
                pids = _train_worker_pids()
                if len(pids) == 2:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = run_train(cfg, manifest, **QUIET)
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    for key in ("step", "val_loss", "val_accuracy", "val_macro_f1"):
        assert result["metrics"][key] == pytest.approx(reference["metrics"][key], abs=1e-5), key
    c = MlflowClient(cfg.tracking.tracking_uri)
    _assert_restored_not_retrained(c, result["run_id"], result["metrics"]["step"])


def test_bad_training_input_is_refused_before_any_worker_starts(data, tmp_path):
    tmp, path = data
    raw = _cfg(tmp, path, "bad")
    config = write_yaml(tmp_path / "bad.yaml", raw)
    assert runner.invoke(app, ["preprocess", str(config)]).exit_code == 0
    cases = {
        ("train.global_batch_size=33",): "does not divide across 2 workers",
        ("scaling.use_gpu=true",): "has no GPU",
        # The smoke model has 2.1M weights: over 2 workers that is below 5M per worker.
        ("train.strategy=fsdp", "train.fsdp_min_params_per_worker=5000000"): "too small to shard",
        (f"train.resume_from={tmp_path / 'nothing'}",): "does not exist",
        ("peft.lora.target_modules=[no_such_layer]",): "no_such_layer",
    }
    for overrides, message in cases.items():
        started = time.time()
        args = [x for override in overrides for x in ("--set", override)]
        result = runner.invoke(app, ["train", str(config), *args])
        assert result.exit_code == 2, (overrides, result.output)
        assert message in result.output, (overrides, result.output)
        assert time.time() - started < 60


def test_a_killed_driver_resumes_on_the_same_command(data, ddp_run, tmp_path):
    """SIGTERM mid-run ends the MLflow run KILLED; the same command resumes it to the end."""
    tmp, path = data
    _, _, reference = ddp_run
    raw = _cfg(tmp, path, "driver")
    config = write_yaml(tmp_path / "driver.yaml", raw)
    assert runner.invoke(app, ["preprocess", str(config)]).exit_code == 0
    storage = validate_experiment(raw).checkpoint_root
    command = [str(Path(sys.executable).parent / "lepton-ray"), "train", str(config)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not _checkpoint_registered(storage):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=120)[0].decode()
    assert first.returncode != 0, out[-2000:]
    c = MlflowClient(raw["tracking"]["tracking_uri"])
    exp = c.get_experiment_by_name("driver")
    runs = c.search_runs([exp.experiment_id], "tags.`lepton.stage` = 'train'")
    assert [r.info.status for r in runs] == ["KILLED"]

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming run" in second.stdout
    runs = c.search_runs([exp.experiment_id], "tags.`lepton.stage` = 'train'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # no second run
    final = runs[0].data.metrics
    assert final["val_loss"] == pytest.approx(reference["metrics"]["val_loss"], abs=1e-5)
    _assert_restored_not_retrained(c, runs[0].info.run_id, final["step"])
