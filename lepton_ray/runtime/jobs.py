"""Ray Jobs: submit an experiment to a cluster, and list, follow or stop its jobs.

``lepton-ray submit CONFIG --address http://HEAD:8265`` ships this project (the working dir,
less outputs, stores and virtualenvs) with ``cluster/runtime_env.yaml`` and runs
``python -m lepton_ray run CONFIG`` as the job's entrypoint on the cluster: the interpreter
that has lepton-ray's dependencies, which need not put a ``lepton-ray`` script on the PATH
(``lepton-ray cluster up`` puts its own interpreter first on the cluster's PATH). The config
is validated here first, so a typo fails before anything is uploaded. What is printed about
a job (its entrypoint, its message, its logs) has the credentials of URIs redacted, as the
``--set`` values that it carries may hold some.

Auth is explicit: with ``--auth token`` (or ``auto`` and a token found) every request carries
``Authorization: Bearer <token>``; the token comes from ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, in that order (what ``ray get-auth-token``
prints on the head node). A refused or missing token is one clear line.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from lepton_ray.errors import ConfigError, LeptonError
from lepton_ray.tracking.mlflow import redact_uri

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = "RAY_JOB_ADDRESS"
RUNTIME_ENV = Path("cluster") / "runtime_env.yaml"
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "**/.ipynb_checkpoints",
    "outputs",
    "mlruns",
    "ray_results",
    "*.db",
]
"""Never shipped: runs, stores, caches and virtualenvs (the cluster image has the packages)."""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_COMMANDS = ("run", "validate", "preprocess", "train", "tune", "compress")
"""The ``lepton-ray`` commands a job can run on the cluster (``submit --command``)."""
META_EXPERIMENT = "lepton.experiment"
META_CONFIG = "lepton.config"


class JobError(LeptonError):
    """The cluster refused a request, or a job did not succeed."""


class JobFailed(LeptonError):
    exit_code = 1


# ------------------------------------------------------------------------------------- auth
def find_token() -> tuple[str | None, str]:
    """(token, where it came from): RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    candidates = [Path(named).expanduser()] if named else []
    candidates.append(Path.home() / ".ray" / "auth_token")
    for path in candidates:
        token = path.read_text().strip() if path.is_file() else ""
        if token:
            return token, str(path)
    if named:
        raise JobError(f"RAY_AUTH_TOKEN_PATH names {named}, which is missing or empty")
    return None, ""


def auth_headers(auth: str) -> dict[str, str]:
    """Request headers for ``--auth token|auto|disabled``."""
    if auth not in ("token", "auto", "disabled"):
        raise ConfigError(f"--auth must be token, auto or disabled, got {auth!r}")
    if auth == "disabled":
        return {}
    token, _ = find_token()
    if token is None:
        if auth == "token":
            raise JobError(
                "--auth token: no token found; set RAY_AUTH_TOKEN to the cluster's token "
                "(`ray get-auth-token` on the head node prints it) or RAY_AUTH_TOKEN_PATH to a "
                "file holding it"
            )
        return {}
    return {"Authorization": f"Bearer {token}"}


def job_address(address: str | None) -> str:
    """--address, else $RAY_JOB_ADDRESS, else an http RAY_ADDRESS, else the local dashboard."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if not address.startswith(("http://", "https://")):
        raise ConfigError(
            f"--address {address!r}: the Ray Jobs API is the dashboard's HTTP address, "
            "e.g. http://127.0.0.1:8265"
        )
    return address.rstrip("/")


class Jobs:
    """A ``JobSubmissionClient`` whose errors are one line naming the cluster and the cause."""

    def __init__(self, address: str | None = None, auth: str = "auto"):
        from ray.job_submission import JobSubmissionClient

        self.address = job_address(address)
        self.headers = auth_headers(auth)
        # Ray would add its own Authorization header from its token loader only when the
        # caller gave none; with RAY_AUTH_MODE unset it may also pick up a stale token file.
        self.client = self._call(
            lambda: JobSubmissionClient(self.address, headers=dict(self.headers))
        )

    def _call(self, make):
        from ray.exceptions import AuthenticationError

        try:
            return make()
        except AuthenticationError as err:
            raise self._refusal(err) from None
        except ConnectionError as err:
            raise JobError(
                f"cannot reach the Ray Jobs API at {self.address} ({first_line(err)}); is the "
                "cluster up? For a remote cluster, forward the dashboard to this machine "
                "(`ray dashboard cluster/aws-gpu.yaml`, or an SSH tunnel to port 8265); never "
                "expose the dashboard port publicly"
            ) from None
        except RuntimeError as err:
            raise self._refusal(err) from None

    def _refusal(self, err: Exception) -> LeptonError:
        text = str(err)
        status = re.search(r"status code (\d{3})", text)
        code = int(status.group(1)) if status else None
        if code == 401 or "Missing authentication" in text or "Unauthorized" in text:
            return JobError(
                f"the Ray cluster at {self.address} requires token authentication and no token "
                "was sent; set RAY_AUTH_TOKEN (`ray get-auth-token` on the head node prints "
                "it) and use --auth token or auto"
            )
        if code == 403 or "Invalid authentication" in text or "Forbidden" in text:
            _, where = find_token()
            return JobError(
                f"the Ray cluster at {self.address} refused the token from "
                f"{where or 'the environment'}: it is not this cluster's token "
                "(`ray get-auth-token` on the head node prints the right one)"
            )
        if code == 404 or "does not exist" in text:
            return JobError(f"{first_line(err)} (cluster {self.address})")
        return JobError(f"the Ray Jobs API at {self.address}: {first_line(err)}")

    # -------------------------------------------------------------------------- requests
    def submit(self, **kwargs) -> str:
        return self._call(lambda: self.client.submit_job(**kwargs))

    def list(self) -> list[Any]:
        return self._call(self.client.list_jobs)

    def info(self, job_id: str):
        return self._call(lambda: self.client.get_job_info(job_id))

    def status(self, job_id: str) -> str:
        return str(self._call(lambda: self.client.get_job_status(job_id)).value)

    def logs(self, job_id: str) -> str:
        return redact_uri(self._call(lambda: self.client.get_job_logs(job_id)))

    def stop(self, job_id: str) -> bool:
        return self._call(lambda: self.client.stop_job(job_id))

    def follow(self, job_id: str, write) -> str:
        """Stream the job's logs until it ends; returns its final status."""
        self.info(job_id)  # a wrong id or token fails here, clearly, not in the stream

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(redact_uri(chunk))

        try:
            asyncio.run(tail())
        except Exception as err:  # noqa: BLE001 - the stream breaking is not the job failing
            write(f"[jobs] log stream ended early ({first_line(err)}); waiting for the job\n")
        return self.wait(job_id)

    def wait(self, job_id: str, timeout_s: float | None = None) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status in TERMINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                return status
            time.sleep(1.0)


def first_line(err: Exception | str) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------- submit
def runtime_env(project: Path, path: Path | None = None) -> dict[str, Any]:
    """``cluster/runtime_env.yaml`` with the project as working_dir and the default excludes."""
    path = path or project / RUNTIME_ENV
    if not path.is_file():
        raise ConfigError(f"runtime env file not found: {path}")
    try:
        env = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {first_line(err)}") from None
    if not isinstance(env, dict):
        raise ConfigError(f"{path}: expected a mapping (working_dir, env_vars, ...)")
    working_dir = str(env.get("working_dir", "."))
    # Relative to the project (the file says ``.``); a URI (a zip in a bucket) is kept.
    env["working_dir"] = working_dir if "://" in working_dir else str(project / working_dir)
    excludes = list(env.get("excludes") or [])
    env["excludes"] = excludes + [e for e in DEFAULT_EXCLUDES if e not in excludes]
    env_vars = {str(k): str(v) for k, v in (env.get("env_vars") or {}).items()}
    env["env_vars"] = env_vars
    return env


def object_store_env(cfg, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The object-store settings (endpoint, region, credentials) of ``environ`` that a job
    needs when the config writes to an object store: they travel in the job's runtime env,
    never in the config or the entrypoint."""
    from lepton_ray.runtime.storage import storage_uris
    from lepton_ray.runtime.uri import S3_ENV

    environ = os.environ if environ is None else environ
    if not storage_uris(cfg):
        return {}
    return {k: environ[k] for k in S3_ENV if environ.get(k)}


def check_submittable(cfg) -> list[str]:
    """Refuse settings that would lose a job's results; return warnings worth printing."""
    uri = cfg.tracking.tracking_uri
    if not uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"tracking.tracking_uri {uri} is a store on the job's node: the runs, the registry "
            "and the served model would stay in a folder Ray deletes with the job's working "
            "dir. Point it at a tracking server, e.g. --set "
            "tracking.tracking_uri=http://MLFLOW-HOST:5000 (cluster/mlflow/ has a recipe)"
        )
    warnings = []
    if cfg.cluster.storage_path is None:
        warnings.append(
            "cluster.storage_path is not set: shards and checkpoints go to output_dir inside "
            "the job's working dir on the head node (lost when Ray cleans it; refused on a "
            "multi-node cluster). Set --set cluster.storage_path=/shared/folder"
        )
    return warnings


def submit(
    config: Path,
    address: str | None = None,
    overrides: list[str] | None = None,
    auth: str = "auto",
    project: Path | None = None,
    runtime_env_file: Path | None = None,
    submission_id: str | None = None,
    command: str = "run",
    log=print,
) -> tuple[Jobs, str]:
    """Submit ``lepton-ray COMMAND CONFIG`` as a Ray job; returns (client, submission id)."""
    from lepton_ray.config import load_experiment

    if command not in JOB_COMMANDS:
        raise ConfigError(f"--command must be one of {', '.join(JOB_COMMANDS)}, got {command!r}")
    project = (project or Path.cwd()).resolve()
    config = Path(config)
    if not config.is_file():
        raise ConfigError(f"config file not found: {config}")
    try:
        relative = config.resolve().relative_to(project)
    except ValueError:
        raise ConfigError(
            f"{config} is outside the project folder {project} that the job ships; "
            "copy it under the project (e.g. experiments/) or pass --project"
        ) from None
    overrides = list(overrides or [])
    # The data may live on the cluster's storage only: files are checked where the job runs.
    cfg = load_experiment(config, overrides, check_files=False)
    for warning in check_submittable(cfg):
        log(f"[submit] warning: {warning}")
    env = runtime_env(project, runtime_env_file)
    forwarded = {k: v for k, v in object_store_env(cfg).items() if k not in env["env_vars"]}
    if forwarded:
        env["env_vars"].update(forwarded)
        log(f"[submit] the job gets {', '.join(sorted(forwarded))} from this environment")
    sets = [a for o in overrides for a in ("--set", o)]
    entrypoint = shlex.join(["python", "-m", "lepton_ray", command, relative.as_posix(), *sets])
    jobs = Jobs(address, auth)
    import logging

    # Ray's packaging logs every ignored file, and warns about its own default excludes.
    logging.getLogger("ray").setLevel(logging.ERROR)
    submission_id = submission_id or (
        f"lepton-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    )
    job_id = jobs.submit(
        entrypoint=entrypoint,
        runtime_env=env,
        submission_id=submission_id,
        metadata={META_EXPERIMENT: cfg.name, META_CONFIG: relative.as_posix()},
    )
    log(f"[submit] {job_id} submitted to {jobs.address}: {redact_uri(entrypoint)}")
    return jobs, job_id


def describe(job) -> dict[str, Any]:
    """One job as a flat row for ``jobs list`` / ``jobs status``, credentials redacted."""
    meta = job.metadata or {}

    def stamp(ms):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""

    return {
        "id": job.submission_id or job.job_id,
        "status": str(getattr(job.status, "value", job.status)),
        "experiment": meta.get(META_EXPERIMENT, ""),
        "started": stamp(job.start_time),
        "ended": stamp(job.end_time),
        "entrypoint": redact_uri(job.entrypoint),
        "message": redact_uri(job.message or ""),
    }
