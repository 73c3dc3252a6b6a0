"""Sweeps through the CLI on the tiny BERT, against the test session's Ray and a real MLflow
store: a conditional space (each trial logs only the branch it took), the best config as
YAML that ``lepton-ray validate`` accepts, a warm start from an earlier sweep, and a driver
killed mid-sweep that ``lepton-ray tune --resume`` continues (one MLflow run per trial)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.data.sample import write_reviews_csv
from tests.conftest import ROOT, smoke_config, write_yaml

pytestmark = pytest.mark.slow
runner = CliRunner()

CONDITIONAL_SPACE = {
    "peft.method": {"type": "choice", "values": ["none", "lora"]},
    "peft.lora.r": {"type": "choice", "values": [2, 8], "when": {"peft.method": "lora"}},
    "peft.lora.lora_alpha": {
        "ratio_of": "peft.lora.r",
        "values": [1, 2],
        "when": {"peft.method": "lora"},
    },
    "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "data.max_length": {"type": "choice", "values": [16, 32]},  # tokenized once, at 32
}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    return write_reviews_csv(tmp_path_factory.mktemp("sweeps") / "reviews.csv", n=200, seed=7)


def _config(tmp: Path, data: Path, name: str, train: dict | None = None, **tune) -> dict:
    """One Ray Train worker per trial, so two trials run side by side on 2 CPUs."""
    return smoke_config(
        tmp,
        data,
        name=name,
        scaling={"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        train={"epochs": 2, "max_steps_per_epoch": 3, **(train or {})},
        tune={"enabled": True, "metric": "val_loss", **tune},
    )


def _tune(path: Path, *args: str):
    """``lepton-ray preprocess`` then ``lepton-ray tune`` (which reads preprocessed data)."""
    prepared = runner.invoke(app, ["preprocess", str(path)])
    assert prepared.exit_code == 0, prepared.output
    return runner.invoke(app, ["tune", str(path), *args])


def _runs(client: MlflowClient, experiment: str, stage: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`lepton.stage` = '{stage}'")


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, reviews, ray_session):
    tmp = tmp_path_factory.mktemp("conditional")
    raw = _config(
        tmp,
        reviews,
        "condsweep",
        num_samples=4,
        seed=8,
        # Every trial sampled at random from the seed (no model of results that arrive in
        # timing's order): with the space in the YAML's (sorted) key order, seed 8 takes
        # both branches and both lengths.
        startup_trials=4,
        space=CONDITIONAL_SPACE,
        # The two best by val_loss are then compressed (dynamic int8 here), scored and
        # timed as served; latency is a second objective, under a loose constraint.
        objective="served",
        served_top_k=2,
        served_batch_size=4,
        latency_objective=True,
        constraints={"p50_ms": 10000},
    )
    path = write_yaml(tmp / "sweep.yaml", raw)
    result = _tune(path)
    assert result.exit_code == 0, result.output
    client = MlflowClient(
        raw["tracking"]["tracking_uri"], registry_uri=raw["tracking"]["tracking_uri"]
    )
    return {"tmp": tmp, "raw": raw, "output": result.output, "client": client}


def test_each_trial_logs_only_the_branch_it_took(conditional):
    c = conditional["client"]
    (parent,) = _runs(c, "condsweep", "tune")
    trials = _runs(c, "condsweep", "trial")
    ids = [run.data.tags["lepton.trial_id"] for run in trials]
    assert len(trials) == 4 and len(set(ids)) == 4  # one MLflow run per trial
    trainable: dict[str, list[float]] = {}
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        params, tags = run.data.params, run.data.tags
        method = params["peft.method"]
        assert tags["lepton.param.peft.method"] == method
        lr = float(params["train.lr"])
        assert 1e-4 <= lr <= 1e-2 and float(tags["lepton.param.train.lr"]) == lr
        if method == "none":
            # The LoRA keys were never sampled and no LoRA setting applies: none is logged
            # or tagged, not even with the config's values.
            assert not [k for k in params if k.startswith("peft.lora.")], params
            assert not [k for k in tags if k.startswith("lepton.param.peft.lora.")], tags
        else:
            r, alpha = int(params["peft.lora.r"]), int(params["peft.lora.lora_alpha"])
            assert r in (2, 8) and alpha // r in (1, 2) and alpha % r == 0, (r, alpha)
            assert tags["lepton.param.peft.lora.r"] == str(r)
            # What the searcher modelled: the multiplier, not the product.
            searched = json.loads(tags["lepton.searcher_values"])
            assert searched["peft.lora.lora_alpha[ratio]"] * r == alpha, searched
        trainable.setdefault(method, []).append(run.data.metrics["params_trainable"])
    # data.max_length: tokenized once at 32; a trial that took 16 cut its rows to 16.
    lengths = {int(run.data.params["data.max_length"]) for run in trials}
    assert lengths == {16, 32}, lengths  # seed 8 samples both
    assert "[train] data.max_length 16: " in conditional["output"]
    # Seed 8 samples both branches; full fine-tuning trains every weight, LoRA a few.
    assert set(trainable) == {"none", "lora"}, trainable
    assert max(trainable["lora"]) < min(trainable["none"]) / 10, trainable


def test_the_sweep_logs_its_plots_table_and_best_config(conditional):
    c, raw, out = conditional["client"], conditional["raw"], conditional["output"]
    (parent,) = _runs(c, "condsweep", "tune")
    artifacts = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert {
        "plots/sweep.png",
        "plots/optuna_history.png",
        "plots/optuna_importances.png",
        "plots/optuna_parallel_coordinates.png",
    } <= artifacts, artifacts
    # Outside a terminal, the live table writes a line per change of a trial.
    assert "RUNNING" in out and "DONE" in out and "[tune] trial " in out
    best_id = parent.data.tags["lepton.best_trial_id"]
    (best,) = [r for r in _runs(c, "condsweep", "trial") if r.data.tags.get("lepton.best_trial")]
    assert best.data.tags["lepton.trial_id"] == best_id
    trials = json.loads(
        Path(c.download_artifacts(parent.info.run_id, "tune/trials.json")).read_text()
    )
    assert trials["best"]["trial_id"] == best_id

    # The best config: on disk and in MLflow, the same text, accepted as it is.
    path = Path(raw["output_dir"]) / "condsweep" / "best_config.yaml"
    text = path.read_text()
    assert c.download_artifacts(parent.info.run_id, "tune/best_config.yaml")
    assert (
        Path(c.download_artifacts(parent.info.run_id, "tune/best_config.yaml")).read_text() == text
    )
    assert text.startswith(f"# Best trial {best_id} of sweep {parent.info.run_id}")
    best_cfg = yaml.safe_load(text)
    assert best_cfg["tune"]["enabled"] is False
    assert best_cfg["peft"]["method"] == best.data.params["peft.method"]
    assert best_cfg["train"]["lr"] == pytest.approx(float(best.data.params["train.lr"]))
    checked = runner.invoke(app, ["validate", str(path)])
    assert checked.exit_code == 0, checked.output
    # The sweep registered its best trial.
    (version,) = c.search_model_versions("name = 'condsweep'")
    assert version.run_id == best.info.run_id


def test_the_served_objective_ranks_the_best_trials_as_served(conditional):
    """objective served: the 2 best trials by val_loss are compressed, scored and timed;
    the winner is the best served val_loss on the Pareto front (val_loss, p50 ms), both
    rankings are printed and logged, and the winner is what the sweep registered."""
    c, out = conditional["client"], conditional["output"]
    (parent,) = _runs(c, "condsweep", "tune")
    trials = _runs(c, "condsweep", "trial")
    by_id = {r.data.tags["lepton.trial_id"]: r for r in trials}
    served = json.loads(
        Path(c.download_artifacts(parent.info.run_id, "tune/served.json")).read_text()
    )
    rows = served["trials"]
    assert len(rows) == 2
    # The two scored are the float ranking's top two, best first.
    losses = sorted((r.data.metrics["best_val_loss"], tid) for tid, r in by_id.items())
    assert [row["trial_id"] for row in rows] == [tid for _, tid in losses[:2]]
    for row in rows:
        # Compressed as the compress stage would on this CPU; float where its gate refused.
        accepted = " within " in row["compression"]
        assert (row["format"] != "float32") == accepted, row
        assert row["format"] in ("dynamic_int8", "bf16", "float32"), row
        assert 0 < row["p50_ms"] < 10000 and row["p50_ms_batch"] > 0
        metrics = by_id[row["trial_id"]].data.metrics
        assert metrics["served_val_loss"] == pytest.approx(row["served"])
        assert metrics["served_p50_ms"] == pytest.approx(row["p50_ms"])
    front = set(served["front"])
    assert front and front <= {row["trial_id"] for row in rows}
    winner = min(
        (row for row in rows if row["trial_id"] in front),
        key=lambda row: (row["served"], row["p50_ms"]),
    )
    assert served["winner"] == winner["trial_id"]
    tags = parent.data.tags
    assert tags["lepton.served_best_trial_id"] == winner["trial_id"] == tags["lepton.best_trial_id"]
    assert tags["lepton.float_best_trial_id"] == rows[0]["trial_id"]
    assert tags["lepton.rankings_agree"] == str(rows[0]["trial_id"] == winner["trial_id"]).lower()
    # Both rankings, side by side, in the log and in MLflow; the front is plotted.
    summary = Path(c.download_artifacts(parent.info.run_id, "tune/served_summary.txt")).read_text()
    assert "float rank" in summary and "served rank" in summary
    assert f"winner: trial {winner['trial_id']}" in summary and "Pareto front" in summary
    assert f"[tune] winner: trial {winner['trial_id']}" in out
    assert "plots/served_pareto.png" in {
        a.path for a in c.list_artifacts(parent.info.run_id, "plots")
    }
    # The registered version is the served winner's model.
    (version,) = c.search_model_versions("name = 'condsweep'")
    assert version.run_id == by_id[winner["trial_id"]].info.run_id


def test_a_warm_start_seeds_the_searcher_with_an_earlier_sweep(conditional, reviews, tmp_path):
    finished = len(_runs(conditional["client"], "condsweep", "trial"))
    tracking = conditional["raw"]["tracking"]
    raw = _config(
        tmp_path,
        reviews,
        "warmsweep",
        num_samples=1,
        seed=4,
        space=CONDITIONAL_SPACE,
        warm_start="condsweep",
    )
    raw["tracking"] = tracking  # the same store, where experiment condsweep lives
    path = write_yaml(tmp_path / "warm.yaml", raw)
    result = _tune(path)
    assert result.exit_code == 0, result.output
    assert (
        f"warm start: {finished} finished trials of experiment 'condsweep' seed the searcher"
        in result.output
    ), result.output
    assert len(_runs(conditional["client"], "warmsweep", "trial")) == 1

    raw["tune"]["warm_start"] = "no-such-sweep"
    write_yaml(path, raw)
    missing = runner.invoke(app, ["tune", str(path)])
    assert missing.exit_code != 0
    assert "tune.warm_start: no MLflow experiment named 'no-such-sweep'" in missing.output


def _trial_checkpoints(storage: Path) -> int:
    """Trials whose Ray Train run has recorded a checkpoint (a restart restores it)."""
    count = 0
    for snapshot in storage.rglob("*-trial-*/checkpoint_manager_snapshot.json"):
        try:
            count += bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
        except (OSError, ValueError):
            continue  # being written
    return count


def test_a_killed_sweep_resumes_with_resume(tmp_path, ray_session):
    """SIGKILL the driver while trial 2 of a 2-point grid is mid-way (trial 1 done); the same
    command with --resume keeps trial 1, restarts trial 2 from its checkpoint, and leaves one
    parent run and one run per trial."""
    # Trial 2 must still be training 2.5 s after its first checkpoint: the tiny test model
    # ran its 12 steps in about a second, so this test trains a MiniLM-sized (random) model
    # on more rows for 4 epochs of 20 steps.
    rows = write_reviews_csv(tmp_path / "reviews.csv", n=1000, seed=7)
    raw = _config(
        tmp_path,
        rows,
        "resumesweep",
        train={"epochs": 4, "max_steps_per_epoch": 20},
        search="grid",
        num_samples=2,
        max_concurrent_trials=1,
        scheduler={"type": "none"},
        space={"train.lr": {"type": "grid", "values": [1e-3, 4e-3]}},
    )
    raw["model"]["config_overrides"] = {
        "num_hidden_layers": 3,
        "hidden_size": 384,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
    }
    config = write_yaml(tmp_path / "resume.yaml", raw)
    assert runner.invoke(app, ["preprocess", str(config)]).exit_code == 0
    storage = Path(raw["cluster"]["storage_path"])
    client = MlflowClient(raw["tracking"]["tracking_uri"])
    command = [str(Path(sys.executable).parent / "lepton-ray"), "tune", str(config)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    done: list = []
    while not (done and _trial_checkpoints(storage) >= 2):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        if client.get_experiment_by_name("resumesweep"):
            done = [r for r in _runs(client, "resumesweep", "trial") if r.info.status == "FINISHED"]
        time.sleep(0.5)
    time.sleep(2.5)  # Tune saves the sweep's state every 2 s
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    (kept,) = done
    kept_metrics = client.get_run(kept.info.run_id).data.metrics

    second = subprocess.run(
        command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resuming the sweep" in out, out[-4000:]
    parents = _runs(client, "resumesweep", "tune")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = _runs(client, "resumesweep", "trial")
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    assert sorted(float(r.data.params["train.lr"]) for r in trials) == [1e-3, 4e-3]
    # Trial 1 was not run again: its metrics are those it had before the kill.
    assert client.get_run(kept.info.run_id).data.metrics == kept_metrics
    # The interrupted trial went on from its checkpoint, in its own run.
    resumed = [r for r in trials if "resumed_at_step" in r.data.metrics]
    assert len(resumed) == 1 and resumed[0].data.metrics["resumed_at_step"] > 0, resumed
    at = resumed[0].data.metrics["resumed_at_step"]
    history = client.get_metric_history(resumed[0].info.run_id, "train_loss_step")
    before = [m.step for m in history if m.step <= at]
    assert len(before) == len(set(before)), before  # nothing up to the checkpoint trained twice
    assert resumed[0].data.metrics["step"] == 80  # and it trained on to the end: 4 epochs x 20


def test_hyperband_and_a_failing_trial_retried_then_recorded(reviews, tmp_path, ray_session):
    """HyperBand over a 2-point grid whose second point cannot train (a LoRA target the model
    lacks): that trial is started 1 + tune.max_failures times in one MLflow run, then
    recorded as FAILED with its error, and the sweep still ends and registers its best.

    The broken trial is the good one's only peer in its bracket: Tune's own HyperBand kept
    the good trial paused at its milestone and the sweep never ended (fixed in
    lepton_ray/tune/schedulers.py)."""
    raw = _config(
        tmp_path,
        reviews,
        "hbsweep",
        search="grid",
        num_samples=2,
        max_failures=1,
        scheduler={"type": "hyperband", "max_t": 2, "reduction_factor": 2},
        space={
            "peft.lora.target_modules": {
                "type": "grid",
                "values": [["query", "value"], ["no_such_module"]],
            }
        },
    )
    raw["peft"] = {"method": "lora", "lora": {"r": 4, "lora_alpha": 8}}
    result = _tune(write_yaml(tmp_path / "hb.yaml", raw))
    assert result.exit_code == 0, result.output
    assert "with Optuna grid + hyperband" in result.output
    c = MlflowClient(raw["tracking"]["tracking_uri"])
    trials = _runs(c, "hbsweep", "trial")
    assert len(trials) == 2  # one run per trial, retries included
    targets = {r.data.params["peft.lora.target_modules"] for r in trials}
    assert len(targets) == 2, targets  # the grid visited each point once
    (broken,) = [r for r in trials if "no_such_module" in r.data.params["peft.lora.target_modules"]]
    assert broken.info.status == "FAILED"
    assert broken.data.tags["lepton.trial_starts"] == "2"  # the first try and one retry
    line = next(
        ln for ln in result.output.splitlines() if broken.data.tags["lepton.trial_id"] + ":" in ln
    )
    assert "(started 2 times)" in line and "ERROR" in line and "no_such_module" in line, line
    finished = [r for r in trials if r is not broken]
    assert {r.info.status for r in finished} <= {"FINISHED", "KILLED"}
    (best,) = [r for r in finished if r.data.tags.get("lepton.best_trial")]
    (version,) = c.search_model_versions("name = 'hbsweep'")
    assert version.run_id == best.info.run_id
