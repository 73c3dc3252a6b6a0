"""An object store as the storage root: ``cluster.storage_path: s3://bucket/prefix`` against a
real S3-compatible server on this machine (moto, server mode, 127.0.0.1, authentication on).

The stages write their shards, manifest and checkpoints into the bucket and MLflow its
artifacts; a missing bucket, wrong credentials and an unreachable endpoint are each one line
and a non-zero exit before any stage starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lepton_ray.data.sample import write_reviews_csv
from lepton_ray.runtime.cluster import free_port
from tests.conftest import ROOT, smoke_config, write_yaml
from tests.integration.s3_server import S3Server

CLI = str(Path(sys.executable).parent / "lepton-ray")


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    try:
        yield server.start()
    finally:
        server.stop()


def lepton(args: list[str], env: dict[str, str], timeout: float = 600):
    return subprocess.run(
        [CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _config(tmp: Path, s3: S3Server, prefix: str, **sections) -> Path:
    data = write_reviews_csv(tmp / "reviews.csv", n=160, seed=3)
    raw = smoke_config(tmp, data, **sections)
    raw["cluster"]["storage_path"] = f"s3://{s3.bucket}/{prefix}"
    raw["tracking"]["artifact_location"] = f"s3://{s3.bucket}/{prefix}/mlflow"
    return write_yaml(tmp / "smoke.yaml", raw)


def _one_clear_line(done: subprocess.CompletedProcess) -> str:
    out = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


# ------------------------------------------------------------------------------ failure modes
def test_validate_reaches_the_bucket(tmp_path, s3):
    path = _config(tmp_path, s3, "ok")
    done = lepton(["validate", str(path)], s3.env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cluster.storage_path s3://{s3.bucket}/ok: reachable" in done.stdout
    assert "is a valid" in done.stdout
    # The write probe leaves no object behind (pyarrow keeps empty "folder/" markers).
    assert [k for k in s3.keys("ok/") if not k.endswith("/")] == []


def test_a_missing_bucket_is_one_line(tmp_path, s3):
    path = _config(tmp_path, s3, "x")
    done = lepton(["validate", str(path), "--set", "cluster.storage_path=s3://no-such-bucket/x"], s3.env())  # fmt: skip
    line = _one_clear_line(done)
    assert "cluster.storage_path s3://no-such-bucket/x" in line
    assert "bucket 'no-such-bucket' does not exist" in line and s3.endpoint in line


def test_wrong_credentials_are_one_line_before_any_stage(tmp_path, s3):
    path = _config(tmp_path, s3, "denied")
    env = s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret")
    line = _one_clear_line(lepton(["validate", str(path)], env))
    assert f"s3://{s3.bucket}/denied" in line and "access denied" in line
    assert "not-the-secret" not in line
    # The stage command stops there too: no Ray, no data read, nothing in the bucket.
    done = lepton(["preprocess", str(path)], env)
    line = _one_clear_line(done)
    assert "access denied" in line and "[data]" not in done.stdout
    assert [k for k in s3.keys("denied/") if not k.endswith("/")] == []


def test_an_unreachable_endpoint_is_one_line(tmp_path, s3):
    path = _config(tmp_path, s3, "x")
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = lepton(["validate", str(path)], s3.env(AWS_ENDPOINT_URL=nowhere))
    line = _one_clear_line(done)
    assert f"s3://{s3.bucket}/x" in line and f"cannot reach {nowhere}" in line


def test_the_mlflow_artifact_bucket_is_checked_too(tmp_path, s3):
    path = _config(tmp_path, s3, "x")
    sets = ["--set", "tracking.artifact_location=s3://missing-artifacts/mlflow"]
    line = _one_clear_line(lepton(["validate", str(path), *sets], s3.env()))
    assert line.startswith("error: tracking.artifact_location s3://missing-artifacts/mlflow")


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_preprocess_and_train_write_to_the_bucket(tmp_path, s3, ray_session):
    """Shards, manifest, checkpoints and the MLflow model artifact are objects in the bucket;
    the workers got the credentials from the driver's environment (the test's Ray has none)."""
    from mlflow.tracking import MlflowClient

    path = _config(tmp_path, s3, "e2e", train={"epochs": 1})
    env = s3.env()
    done = lepton(["preprocess", str(path)], env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    keys = s3.keys("e2e/")
    assert "e2e/smoke/data/manifest.json" in keys
    assert any(k.startswith("e2e/smoke/data/train/part-") for k in keys), keys
    assert any(k.startswith("e2e/smoke/data/validation/part-") for k in keys), keys
    assert not (tmp_path / "storage").exists()  # nothing went to a local folder

    again = lepton(["preprocess", str(path)], env)  # the manifest in the bucket is reused
    assert again.returncode == 0 and "[data] reusing s3://lepton/e2e/smoke/data" in again.stdout

    done = lepton(["train", str(path)], env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert s3.secret not in out
    keys = s3.keys("e2e/")
    checkpoints = [k for k in keys if k.startswith("e2e/ray_results/") and "/checkpoint_" in k]
    assert checkpoints, keys

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    c = MlflowClient(uri, registry_uri=uri)
    version = c.get_model_version_by_alias("smoke", "champion")
    run = c.get_run(version.run_id)
    assert run.info.artifact_uri.startswith("s3://lepton/e2e/mlflow/")
    model = [k for k in keys if k.startswith("e2e/mlflow/") and "/artifacts/model/" in k]
    assert any(k.endswith(".safetensors") or k.endswith(".json") for k in model), keys
    assert not any(s3.secret in str(v) for v in run.data.params.values())


@pytest.mark.slow
def test_two_nodes_share_the_bucket(tmp_path, s3):
    """A real two-node cluster whose nodes have no AWS settings of their own: the driver's
    environment reaches the workers on both nodes, one DDP worker per node trains from the
    shards in the bucket and their checkpoints land there."""
    from mlflow.tracking import MlflowClient

    from tests.integration.two_nodes import TwoNodeCluster

    class NodesWithoutAws(TwoNodeCluster):
        def env(self) -> dict[str, str]:
            return {k: v for k, v in super().env().items() if not k.startswith("AWS_")}

    nodes = NodesWithoutAws(tmp_path / "nodes")
    try:
        nodes.start()
        path = _config(tmp_path, s3, "two", train={"epochs": 1})
        base = {k: v for k, v in nodes.env().items() if k != "RAY_API_SERVER_ADDRESS"}
        env = s3.env(base)
        sets = [
            f"cluster.address=127.0.0.1:{nodes.gcs_port}",
            "cluster.auth=token",
            "scaling.num_workers=2",
            "scaling.resources_per_worker.CPU=1",  # one per node: they must spread
        ]
        args = [a for s in sets for a in ("--set", s)]
        done = lepton(["preprocess", str(path), *args], env)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        done = lepton(["train", str(path), *args], env)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
    finally:
        nodes.stop()
    keys = s3.keys("two/")
    assert "two/smoke/data/manifest.json" in keys
    assert [k for k in keys if k.startswith("two/ray_results/") and "/checkpoint_" in k], keys
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("smoke").experiment_id],
        filter_string="tags.`lepton.stage` = 'train'",
    )
    placed = run.data.tags["lepton.worker_nodes"].split(",")
    assert len(placed) == 2 and len(set(placed)) == 2, placed  # a worker on each node
    assert run.info.artifact_uri.startswith("s3://lepton/two/mlflow/")


@pytest.mark.slow
def test_a_sweep_keeps_its_state_and_trials_in_the_bucket(tmp_path, s3, ray_session):
    """Tune's experiment state, its trials' results and their Ray Train checkpoints go to the
    bucket (``RunConfig(storage_filesystem=...)`` for the sweep and for every trial)."""
    path = _config(
        tmp_path,
        s3,
        "sweep",
        scaling={"num_workers": 1, "resources_per_worker": {"CPU": 1}},
        train={"epochs": 1, "max_steps_per_epoch": 3},
        tune={
            "enabled": True,
            "metric": "val_loss",
            "search": "grid",
            "num_samples": 2,
            "scheduler": {"type": "none"},
            "space": {"train.lr": {"type": "grid", "values": [1e-3, 4e-3]}},
        },
    )
    env = s3.env()
    done = lepton(["preprocess", str(path)], env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    done = lepton(["tune", str(path)], env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    keys = s3.keys("sweep/ray_results/")
    sweeps = {k.split("/")[2] for k in keys if k.split("/")[2].startswith("smoke-tune-")}
    assert len(sweeps) == 1, keys
    (sweep,) = sweeps
    assert any(k.startswith(f"sweep/ray_results/{sweep}/experiment_state") for k in keys), keys
    trained = {k.split("/")[2] for k in keys if "/checkpoint_" in k} - sweeps
    assert len(trained) == 2, keys  # each trial's own Ray Train run kept its checkpoints there
