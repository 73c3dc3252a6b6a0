"""``lepton-ray submit`` (an experiment as a Ray job on a cluster) and ``lepton-ray jobs``:
list, status, logs, stop."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lepton_ray.cli.common import ConfigArg, SetOpt, handle_errors, say

app = typer.Typer(
    no_args_is_help=True,
    help="Ray jobs on a cluster (lepton-ray submit starts one): list, status, logs, stop.",
)
root = typer.Typer()
"""``submit`` sits on the root app: ``lepton_ray.cli`` adds it there."""

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The cluster's Ray Jobs API, i.e. its dashboard: http://HEAD:8265. Default: "
        "$RAY_JOB_ADDRESS, else an http:// RAY_ADDRESS, else http://127.0.0.1:8265.",
    ),
]
AuthOpt = Annotated[
    str,
    typer.Option(
        "--auth",
        help="token: send the cluster's token (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH "
        "names, or ~/.ray/auth_token), and fail if there is none; auto: send one if found; "
        "disabled: send none.",
    ),
]
JobIdArg = Annotated[str, typer.Argument(help="Submission id (lepton-ray jobs list).")]
FollowOpt = Annotated[
    bool, typer.Option("--follow", "-f", help="Stream the job's output until it ends.")
]


def _write_raw(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _job_result(job_id: str, status: str, jobs) -> None:
    if status == "SUCCEEDED":
        say(f"[jobs] {job_id} SUCCEEDED")
        return
    from lepton_ray.runtime.jobs import JobFailed, describe, first_line

    # Ray appends the log's tail to the message: the log was shown already (or is a command away).
    message = describe(jobs.info(job_id))["message"]
    message = first_line(message) if message.strip() else ""
    raise JobFailed(f"job {job_id} ended {status}{': ' + message if message else ''}")


@root.command()
@handle_errors
def submit(
    config: ConfigArg,
    address: AddressOpt = None,
    set_: SetOpt = None,
    follow: FollowOpt = False,
    auth: AuthOpt = "auto",
    runtime_env: Annotated[
        Path | None,
        typer.Option(help="Runtime env YAML. Default: <project>/cluster/runtime_env.yaml."),
    ] = None,
    project: Annotated[
        Path | None,
        typer.Option(help="The folder shipped as the job's working dir. Default: the current one."),
    ] = None,
    command: Annotated[
        str,
        typer.Option(
            help="What the job runs: run (every stage), or one of validate, preprocess, "
            "train, tune, compress."
        ),
    ] = "run",
) -> None:
    """Run an experiment on a Ray cluster as a Ray job (`python -m lepton_ray run CONFIG`
    there, with the cluster's interpreter)."""
    from lepton_ray.runtime.jobs import submit as send

    jobs, job_id = send(config, address, set_, auth, project, runtime_env, command=command, log=say)
    if not follow:
        say(f"follow it with: lepton-ray jobs logs {job_id} --follow --address {jobs.address}")
        return
    _job_result(job_id, jobs.follow(job_id, _write_raw), jobs)


@app.command("list")
@handle_errors
def jobs_list(
    address: AddressOpt = None,
    auth: AuthOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job.")] = False,
) -> None:
    """The cluster's jobs, newest first."""
    from lepton_ray.runtime.jobs import Jobs, describe

    rows = sorted(
        (describe(j) for j in Jobs(address, auth).list()), key=lambda r: r["started"], reverse=True
    )
    if as_json:
        for row in rows:
            _write_raw(json.dumps(row) + "\n")
        return
    if not rows:
        say("no jobs on this cluster")
        return
    say(f"{'ID':<44} {'STATUS':<10} {'EXPERIMENT':<20} {'STARTED':<19}  ENTRYPOINT")
    for r in rows:
        say(
            f"{r['id']:<44} {r['status']:<10} {r['experiment'][:20]:<20} {r['started']:<19}  "
            f"{r['entrypoint']}"
        )


@app.command("status")
@handle_errors
def jobs_status(job_id: JobIdArg, address: AddressOpt = None, auth: AuthOpt = "auto") -> None:
    """One job's status (exit 0 when SUCCEEDED, 1 when it failed or stopped, 3 while running)."""
    from lepton_ray.runtime.jobs import Jobs, describe

    row = describe(Jobs(address, auth).info(job_id))
    say(f"{row['id']}: {row['status']}" + (f" ({row['message']})" if row["message"] else ""))
    say(f"  entrypoint: {row['entrypoint']}")
    if row["status"] in ("FAILED", "STOPPED"):
        raise typer.Exit(1)
    if row["status"] != "SUCCEEDED":
        raise typer.Exit(3)


@app.command("logs")
@handle_errors
def jobs_logs(
    job_id: JobIdArg,
    address: AddressOpt = None,
    auth: AuthOpt = "auto",
    follow: FollowOpt = False,
) -> None:
    """A job's output (the driver's stdout and stderr)."""
    from lepton_ray.runtime.jobs import Jobs

    jobs = Jobs(address, auth)
    if follow:
        _job_result(job_id, jobs.follow(job_id, _write_raw), jobs)
    else:
        _write_raw(jobs.logs(job_id))


@app.command("stop")
@handle_errors
def jobs_stop(
    job_id: JobIdArg,
    address: AddressOpt = None,
    auth: AuthOpt = "auto",
    wait_s: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for it to end (0: do not wait).")
    ] = 60.0,
) -> None:
    """Stop a running job (SIGTERM to its driver: its MLflow runs end KILLED)."""
    from lepton_ray.runtime.jobs import TERMINAL, Jobs

    jobs = Jobs(address, auth)
    if not jobs.stop(job_id):
        say(f"{job_id} had already ended ({jobs.status(job_id)})")
        return
    status = jobs.wait(job_id, timeout_s=wait_s) if wait_s > 0 else jobs.status(job_id)
    say(f"{job_id}: {status}" + ("" if status in TERMINAL else " (stop requested)"))
