"""A real two-node Ray cluster on this machine, with token auth, and a real MLflow server.

Everything binds to 127.0.0.1 on free ports, keeps its state in temp folders of its own (the
worker node runs from another working directory and another Ray temp dir than the head), and
is stopped afterwards by process session: ``ray stop`` would also end the user's clusters.

Ray's CLI refuses a second node on one machine unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1,
and with that set it rewrites 127.0.0.1 in ``--address`` to the machine's network address.
The worker node therefore runs the same ``ray start --address`` through ``NODE_LAUNCHER``,
which lifts the first check and keeps the address as given.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lepton_ray.runtime.cluster import free_port

BIN = Path(sys.executable).parent
NODE_LAUNCHER = """
import sys
import ray._private.ray_constants as constants
import ray._private.services as services
from ray.scripts.scripts import main

constants.ENABLE_RAY_CLUSTER = True  # a second node on this machine
services.resolve_ip_for_localhost = lambda host: host  # ...still reached on 127.0.0.1
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


def _sessions(sid: int) -> list[int]:
    """Pids of every process in session ``sid`` (what one `ray start` daemonized)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # field 6 of stat: the session id; a zombie (Z) has exited, only its reaping is left
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _stop_session(sid: int, grace_s: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _sessions(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _sessions(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token is an answer)
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


class TwoNodeCluster:
    """`ray start --head` + one `ray start --address` worker node, token auth on."""

    def __init__(self, root: Path, cpus_per_node: int = 1):
        self.root = root
        self.token = secrets.token_hex(32)
        self.cpus = cpus_per_node
        self.sessions: list[int] = []
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Short: Ray puts unix sockets under the temp dirs (107-byte path limit).
        self.head_tmp = Path(tempfile.mkdtemp(prefix="lrh-", dir="/tmp"))
        self.worker_tmp = Path(tempfile.mkdtemp(prefix="lrw-", dir="/tmp"))
        self.worker_cwd = root / "worker-node-cwd"
        self.worker_cwd.mkdir(parents=True)
        self.home = root / "home"  # no ~/.ray of the user's is read or written
        self.home.mkdir()

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_", "MLFLOW_")) or k == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
        }
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            HOME=str(self.home),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_API_SERVER_ADDRESS=self.address,
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env

    def _ports(self) -> list[str]:
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]

    def _start(self, cmd: list[str], cwd: Path) -> None:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{out[-3000:]}")

    def start(self) -> TwoNodeCluster:
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}", "--disable-usage-stats"]
        self._start(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.head_tmp}",
                *common,
                *self._ports(),
            ],
            cwd=self.root,
        )
        self._start(
            [
                sys.executable,
                "-c",
                NODE_LAUNCHER,
                "start",
                f"--address=127.0.0.1:{self.gcs_port}",
                f"--temp-dir={self.worker_tmp}",
                *common,
                *self._ports(),
            ],
            cwd=self.worker_cwd,
        )
        _wait_http(f"{self.address}/api/version", 120)
        self.wait_for_nodes(2)
        return self

    def wait_for_nodes(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(BIN / "ray"), "status", f"--address=127.0.0.1:{self.gcs_port}"],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            out = done.stdout
            active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if active.count("node_") >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} nodes did not join:\n{out[-2000:]}")

    def stop(self) -> None:
        for sid in reversed(self.sessions):
            _stop_session(sid)
        # Job drivers and workers forked by the raylets live in these sessions too; anything
        # else still naming our temp dirs goes as well.
        for tmp in (self.head_tmp, self.worker_tmp):
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        if str(tmp) in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                            os.kill(int(entry.name), signal.SIGKILL)
                    except (OSError, ProcessLookupError):
                        pass


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and a local artifact store."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: 8 fewer processes
        self.log = open(self.root / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--workers=1",
                f"--backend-store-uri=sqlite:///{self.root}/mlflow.db",
                f"--artifacts-destination={self.root / 'artifacts'}",
            ],
            cwd=self.root,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_http(f"{self.uri}/health", 120, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop_session(self.proc.pid)
            self.log.close()
