"""`lepton-ray submit` and `lepton-ray jobs` against a real two-node Ray cluster with token
auth, tracking to a real MLflow server: the job completes, its runs, registered version and
shards land where they must, and its training workers and Tune trials ran on both nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.integration.two_nodes import MlflowServer, TwoNodeCluster

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "lepton-ray")
CONFIG = "experiments/quickstart_smoke.yaml"
EXPERIMENT = "quickstart-smoke"
LEAN = ("train.epochs=1", "compress.enabled=false")
"""Placement is what these jobs test: one epoch, and no compression after training."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = TwoNodeCluster(tmp_path_factory.mktemp("two-nodes"))
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The storage both nodes mount (on one machine: the same folder)."""
    return tmp_path_factory.mktemp("shared-storage")


def client_env(cluster: TwoNodeCluster, **extra) -> dict[str, str]:
    """The submitting user's environment: the token, and nothing of the test's own Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update({"HOME": str(cluster.home), "RAY_AUTH_TOKEN": cluster.token, **extra})
    return env


def lepton(args: list[str], env: dict[str, str], timeout: float = 900):
    return subprocess.run(
        [CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def overrides(tracking: MlflowServer, shared: Path, *more: str) -> list[str]:
    sets = [
        f"tracking.tracking_uri={tracking.uri}",
        f"cluster.storage_path={shared}",
        "serve.enabled=false",
        "scaling.resources_per_worker.CPU=1",  # one per node: they must spread
        *more,
    ]
    return [a for s in sets for a in ("--set", s)]


def _job_id(output: str) -> str:
    line = next(ln for ln in output.splitlines() if ln.startswith("[submit] lepton-"))
    return line.split()[1]


def _runs(tracking: MlflowServer, stage: str) -> list:
    c = MlflowClient(tracking.uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, "the job made no MLflow experiment on the tracking server"
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`lepton.stage` = '{stage}'")


def test_ddp_job_spreads_over_both_nodes_and_lands_in_the_tracking_server(
    cluster, tracking, shared
):
    env = client_env(cluster)
    args = ["submit", CONFIG, "--address", cluster.address, "--auth", "token", "--follow"]
    done = lepton(
        args + overrides(tracking, shared, "tune.enabled=false", "scaling.num_workers=2", *LEAN),
        env,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    job = _job_id(out)
    assert f"[jobs] {job} SUCCEEDED" in out
    assert "[train] 2 workers" in out  # the job's own output, streamed by --follow

    # Runs, artifacts and the registry live on the tracking server, not on a node's disk.
    (train,) = _runs(tracking, "train")
    assert train.info.status == "FINISHED"
    nodes = train.data.tags["lepton.worker_nodes"].split(",")
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one DDP worker on each node
    c = MlflowClient(tracking.uri)
    versions = c.search_model_versions(f"name = '{EXPERIMENT}'")
    assert versions, "no registered version on the tracking server"
    assert "model" in {a.path for a in c.list_artifacts(train.info.run_id)}
    # Shards and checkpoints went to the shared storage root.
    manifest = json.loads((shared / EXPERIMENT / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"] > 0
    assert list((shared / "ray_results").glob("*/checkpoint_*"))

    logs = lepton(["jobs", "logs", job, "--address", cluster.address], env)
    assert logs.returncode == 0 and "[train] 2 workers" in logs.stdout, logs.stderr[-2000:]
    status = lepton(["jobs", "status", job, "--address", cluster.address], env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    listed = lepton(["jobs", "list", "--json", "--address", cluster.address], env)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {"id": job, "status": "SUCCEEDED", "experiment": EXPERIMENT}.items() <= next(
        r for r in rows if r["id"] == job
    ).items()


def test_tune_trials_spread_over_both_nodes(cluster, tracking, shared):
    env = client_env(cluster)
    args = ["submit", CONFIG, "--address", cluster.address]  # --auth auto finds the token
    sets = ["tune.enabled=true", "tune.num_samples=2", "scaling.num_workers=1", *LEAN]
    done = lepton(args + overrides(tracking, shared, *sets), env)
    assert done.returncode == 0, done.stderr[-3000:]
    job = _job_id(done.stdout + done.stderr)
    followed = lepton(["jobs", "logs", job, "--follow", "--address", cluster.address], env)
    out = followed.stdout + followed.stderr
    assert followed.returncode == 0, out[-5000:]
    trials = _runs(tracking, "trial")
    assert len(trials) == 2
    placed = {t.data.tags["lepton.worker_nodes"] for t in trials}
    assert len(placed) == 2, placed  # the two concurrent trials ran on different nodes


def test_a_missing_or_wrong_token_is_one_clear_line(cluster, tracking, shared):
    args = ["jobs", "list", "--address", cluster.address]
    missing = lepton(args, client_env(cluster, RAY_AUTH_TOKEN=""))
    assert missing.returncode == 2
    assert "requires token authentication and no token was sent" in missing.stderr
    wrong = lepton(args, client_env(cluster, RAY_AUTH_TOKEN="0" * 64))
    assert wrong.returncode == 2 and "refused the token from RAY_AUTH_TOKEN" in wrong.stderr
    for result in (missing, wrong):
        assert "Traceback" not in result.stdout + result.stderr
    demanded = lepton(["jobs", "list", "--auth", "token"], client_env(cluster, RAY_AUTH_TOKEN=""))
    assert demanded.returncode == 2 and "--auth token: no token found" in demanded.stderr
    unknown = lepton(
        ["jobs", "status", "lepton-nope", "--address", cluster.address], client_env(cluster)
    )
    assert unknown.returncode == 2 and "lepton-nope" in unknown.stderr
    # A local tracking store would vanish with the job's working dir: refused before upload.
    local = lepton(["submit", CONFIG, "--address", cluster.address], client_env(cluster))
    assert local.returncode == 2 and "is a store on the job's node" in local.stderr


def test_a_stopped_job_ends_stopped(cluster, tracking, shared):
    env = client_env(cluster)
    sets = ["tune.enabled=false", "scaling.num_workers=1", "train.epochs=50"]
    sets.append("train.max_steps_per_epoch=1000")
    done = lepton(
        ["submit", CONFIG, "--address", cluster.address] + overrides(tracking, shared, *sets), env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    job = _job_id(done.stdout + done.stderr)
    stopped = lepton(["jobs", "stop", job, "--address", cluster.address, "--wait", "120"], env)
    assert stopped.returncode == 0 and f"{job}: STOPPED" in stopped.stdout, stopped.stdout
    status = lepton(["jobs", "status", job, "--address", cluster.address], env)
    assert status.returncode == 1 and "STOPPED" in status.stdout
