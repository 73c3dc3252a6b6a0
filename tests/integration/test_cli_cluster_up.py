"""`lepton-ray cluster up`, `submit` and `cluster down` run as `make quickstart` and `make stop`
run them: from an environment whose PATH does not have the virtualenv's bin. The cluster has
a temp folder and ports of its own; the test session's Ray runs beside it and must outlive
`cluster down`, while everything of the cluster (Serve's proxy included) must not."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lepton_ray.runtime.cluster import RECORD_FILE, free_port
from tests.conftest import ROOT
from tests.integration.two_nodes import _stop_session

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CONFIG = "experiments/quickstart_smoke.yaml"
SECRET_URI = "https://alice:s3cret@mlflow.example.com"
SERVE_SCRIPT = """
import sys
import ray
from ray import serve

ray.init(address=sys.argv[1])
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})


@serve.deployment(ray_actor_options={"num_cpus": 0})
def hello(request):
    return "hello"


serve.run(hello.bind(), name="hello", route_prefix="/")
"""


def _make_env(ray_tmp: Path) -> dict[str, str]:
    """The user's shell as `make` sees it: no virtualenv on PATH, no Ray of the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN]
    env.update(PATH=os.pathsep.join(path), RAY_TMPDIR=str(ray_tmp), HF_HUB_OFFLINE="1")
    return env


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Quickstart:
    """A cluster started with `.venv/bin/lepton-ray cluster up`, and what was run on it."""

    def __init__(self) -> None:
        # Short: Ray puts unix sockets under it (107-byte path limit).
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="lrc-", dir="/tmp"))
        self.env = _make_env(self.ray_tmp)
        self.port, self.dashboard_port, self.serve_port = free_port(), free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.outputs: dict[str, subprocess.CompletedProcess] = {}

    def lepton(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "lepton-ray"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def record(self) -> dict:
        return json.loads((self.ray_tmp / "ray" / RECORD_FILE).read_text())


@pytest.fixture(scope="module")
def quickstart():
    """Up, a job submitted and listed, a Serve app on it; every command's output kept."""
    qs = Quickstart()
    try:
        assert shutil.which("lepton-ray", path=qs.env["PATH"]) is None
        ports = [f"--port={qs.port}", f"--dashboard-port={qs.dashboard_port}"]
        up = qs.lepton("cluster", "up", "--num-cpus=1", *ports)
        assert up.returncode == 0, up.stdout + up.stderr
        sets = ["--set", f"tracking.tracking_uri={SECRET_URI}"]
        submit = ["submit", CONFIG, "--address", qs.address, "--command", "validate", *sets]
        qs.outputs["submit"] = done = qs.lepton(*submit, "--follow")
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("[submit] lepton-"))
        job = qs.job = line.split()[1]
        for name, args in {
            "list": ["jobs", "list"],
            "list-json": ["jobs", "list", "--json"],
            "status": ["jobs", "status", job],
            "logs": ["jobs", "logs", job],
        }.items():
            qs.outputs[name] = qs.lepton(*args, "--address", qs.address)
        record = qs.record
        served = subprocess.run(
            [sys.executable, "-c", SERVE_SCRIPT, record["address"], str(qs.serve_port)],
            env={**qs.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert served.returncode == 0, served.stderr[-3000:]
        yield qs
    finally:
        if (qs.ray_tmp / "ray" / RECORD_FILE).is_file():  # cluster down did not run or failed
            _stop_session(qs.record["process_session"])
        shutil.rmtree(qs.ray_tmp, ignore_errors=True)


def test_submit_runs_on_the_cluster_make_quickstart_started(quickstart):
    done = quickstart.outputs["submit"]
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert f"[jobs] {quickstart.job} SUCCEEDED" in out
    # The job's own output: the entrypoint ran, from the shipped working dir.
    assert f"ok: {CONFIG} is a valid 'sequence_classification' experiment" in out


def test_submit_and_jobs_print_no_credentials(quickstart):
    for name, done in quickstart.outputs.items():
        assert done.returncode == 0, (name, done.stderr[-3000:])
        assert "s3cret" not in done.stdout + done.stderr, name
    for name in ("submit", "list", "status"):
        assert "tracking.tracking_uri=https://***@mlflow.example.com" in (
            quickstart.outputs[name].stdout
        ), name
    rows = [json.loads(line) for line in quickstart.outputs["list-json"].stdout.splitlines()]
    assert "https://***@mlflow.example.com" in rows[0]["entrypoint"]


def test_cluster_down_stops_the_recorded_cluster_and_no_other_ray(quickstart, ray_session):
    record = quickstart.record
    assert _answers(quickstart.serve_port) and _answers(quickstart.port)
    down = quickstart.lepton("cluster", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"stopped the local cluster at {record['address']}" in down.stdout

    # Nothing of it is left: no process names its session dir, Serve and the GCS are gone.
    left = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            command = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if record["session_dir"].encode() in command and state != "Z":
            left.append(command.replace(b"\0", b" ")[:200])
    assert not left, left
    assert not _answers(quickstart.serve_port) and not _answers(quickstart.port)

    # The session's own Ray, started the other way, still runs tasks.
    @ray_session.remote(num_cpus=0)
    def still_there() -> str:
        return "yes"

    assert ray_session.get(still_there.remote(), timeout=120) == "yes"

    again = quickstart.lepton("cluster", "down")
    assert again.returncode == 2
    assert "no cluster started by `lepton-ray cluster up` is recorded" in again.stderr
