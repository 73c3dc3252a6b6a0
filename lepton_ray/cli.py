"""The ``lepton-ray`` command line. Thin: parse, load the config, call one ``run_*``, print.

Heavy libraries (torch, ray, transformers, mlflow) are imported inside the commands, so
``lepton-ray --help`` answers at once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from lepton_ray import console
from lepton_ray.errors import LeptonError, terminate_as_interrupt

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="lepton-ray: fine-tune, sweep, track, compress and serve Hugging Face models on Ray, "
    "one YAML file per experiment.",
)
cluster_app = typer.Typer(no_args_is_help=True, help="Start, stop or inspect a local Ray cluster.")
app.add_typer(cluster_app, name="cluster")
models_app = typer.Typer(
    no_args_is_help=True,
    help="The model registry: list, show, promote and roll back versions (@champion is served).",
)
app.add_typer(models_app, name="models")

jobs_app = typer.Typer(
    no_args_is_help=True,
    help="Ray jobs on a cluster (lepton-ray submit starts one): list, status, logs, stop.",
)
app.add_typer(jobs_app, name="jobs")

ConfigArg = Annotated[
    Path, typer.Argument(help="Experiment YAML, e.g. experiments/quickstart.yaml.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a key: --set train.lr=3e-4 (repeatable)."),
]
NewOpt = Annotated[
    bool,
    typer.Option(
        "--new",
        help="Start training afresh instead of resuming this experiment's unfinished run.",
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Show Ray's and the libraries' output too (also: lepton-ray -v COMMAND).",
    ),
]
_OPTIONS = {"verbose": False}


@app.callback()
def _global_options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            envvar="LEPTON_VERBOSE",
            help="Show everything on the terminal: Ray's and the libraries' logs, warnings, "
            "progress bars, worker output. By default they go to a log file under the "
            "experiment's outputs (its path is printed first).",
        ),
    ] = False,
) -> None:
    _OPTIONS["verbose"] = verbose


def _say(message: str) -> None:
    console.say(message)


def _fail(message: str, code: int) -> None:
    console.error(f"error: {message}")
    raise typer.Exit(code)


def _start_console(command: str, cfg=None, verbose: bool = False) -> None:
    """Send everything but the stage lines to a log file; call before importing Ray."""
    console.start(
        command,
        cfg.output_dir / cfg.name if cfg is not None else None,
        verbose=verbose or _OPTIONS["verbose"],
    )


def handle_errors(fn):
    """One line and a non-zero exit for user errors; a short line for crashes too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        terminate_as_interrupt()
        try:
            return fn(*args, **kwargs)
        except LeptonError as err:
            console.log_exception(err)
            _fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except typer.Exit:
            raise
        except Exception as err:  # noqa: BLE001 - last resort: no traceback unless asked
            console.log_exception(err)
            if os.environ.get("LEPTON_DEBUG"):
                console.release()  # the traceback goes to the real terminal
                raise
            _fail(
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                "(set LEPTON_DEBUG=1 for the traceback)",
                1,
            )
        finally:
            console.finish()

    return wrapper


def _load(config: Path, overrides: list[str] | None):
    from lepton_ray.config import load_experiment

    return load_experiment(config, overrides or [])


def _quiet_libraries() -> None:
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    active = console.active()
    if active is not None and not active.verbose:
        # The terminal shows stage lines from every worker: Ray must not fold "similar"
        # lines of two Tune trials into one "[repeated 2x across cluster]" (read at import).
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for name in ("ray.data", "ray.tune", "ray.train", "ray.serve", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
@handle_errors
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config (keys, types, ranges, files) without running anything."""
    cfg = _load(config, set_)
    _say(
        f"ok: {config} is a valid '{cfg.task}' experiment named '{cfg.name}' "
        f"(config hash {cfg.fingerprint()})"
    )


@app.command()
@handle_errors
def preprocess(
    config: ConfigArg,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Recompute even if shards for this fingerprint exist."),
    ] = False,
) -> None:
    """Ray Data: read, clean, deduplicate, split, augment, tokenize; write Parquet and a report."""
    cfg = _load(config, set_)
    _start_console("preprocess", cfg, verbose)
    from lepton_ray.data.report import summary_table
    from lepton_ray.pipeline import run_preprocess_stage

    _quiet_libraries()
    manifest = run_preprocess_stage(cfg, log=_say, force=force)
    _say(summary_table(manifest))


@app.command()
@handle_errors
def train(
    config: ConfigArg, set_: SetOpt = None, verbose: VerboseOpt = False, new: NewOpt = False
) -> None:
    """Ray Train: fine-tune with the config's values; register the model (@challenger) and
    promote it to @champion if the registry gate passes.

    Re-running the same command after a crash resumes from the latest checkpoint."""
    cfg = _load(config, set_)
    _start_console("train", cfg, verbose)
    from lepton_ray.pipeline import run_train_stage

    _quiet_libraries()
    best = run_train_stage(cfg, log=_say, new=new)
    _say(f"done: run {best['run_id']}, registered version {best['version']}{_promoted(best)}")


@app.command()
@handle_errors
def tune(config: ConfigArg, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Ray Tune + Optuna + ASHA sweep; register the best trial's model, promote it if gated in."""
    cfg = _load(config, set_)
    _start_console("tune", cfg, verbose)
    from lepton_ray.pipeline import run_tune_stage

    _quiet_libraries()
    best = run_tune_stage(cfg, log=_say)
    _say(f"done: best run {best['run_id']}, registered version {best['version']}{_promoted(best)}")


@app.command()
@handle_errors
def compress(
    config: ConfigArg,
    set_: SetOpt = None,
    model_uri: Annotated[
        str | None,
        typer.Option(help="Default: the champion (its uncompressed source if it is compressed)."),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Merge adapters, quantize, evaluate before/after; register it if the accuracy gate
    passes, and promote it to @champion per the registry policy."""
    cfg = _load(config, set_)
    _start_console("compress", cfg, verbose)
    from lepton_ray.pipeline import run_compress_stage

    _quiet_libraries()
    result = run_compress_stage(cfg, model_uri=model_uri, log=_say)
    if result["compressed_version"] is None:
        _say(f"done: compression refused ({result['reason']})")
    else:
        _say(f"done: registered version {result['version']}{_promoted(result)}")


@app.command()
@handle_errors
def retrain(
    config: ConfigArg,
    data: Annotated[
        str,
        typer.Option(
            "--data", help="New data: a file or glob in the experiment's format and columns."
        ),
    ],
    from_: Annotated[
        str | None,
        typer.Option("--from", help="NAME@ALIAS or NAME/VERSION to continue. Default: @champion."),
    ] = None,
    replay: Annotated[
        float,
        typer.Option(help="Fraction (0-1) of the old training split mixed into the new rows."),
    ] = 0.0,
    no_swap: Annotated[
        bool, typer.Option("--no-swap", help="Leave a running endpoint on its model.")
    ] = False,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Continue fine-tuning the champion on new data; register it as @challenger, gate it
    against the champion on the new data's held-out split, and swap a running endpoint."""
    cfg = _load(config, set_)
    _start_console("retrain", cfg, verbose)
    from lepton_ray.retrain import run_retrain

    _quiet_libraries()
    summary = run_retrain(cfg, data, source_spec=from_, replay=replay, log=_say, swap=not no_swap)
    served = summary.get("serve")
    tail = f"; the endpoint now serves {served['model_uri']}" if served else ""
    verdict = "promoted to @champion" if summary["promoted"] else "not promoted (stays @challenger)"
    _say(
        f"done: v{summary['candidate_version']} (continued from v{summary['source_version']}, "
        f"{summary['replay_rows']} replayed rows) {verdict}{tail}"
    )
    if not summary["promoted"]:
        raise typer.Exit(1)


@app.command()
@handle_errors
def run(
    config: ConfigArg, set_: SetOpt = None, verbose: VerboseOpt = False, new: NewOpt = False
) -> None:
    """Every stage in order: preprocess, train/tune, register, compress, serve."""
    cfg = _load(config, set_)
    _start_console("run", cfg, verbose)
    from lepton_ray.pipeline import run as run_pipeline

    _quiet_libraries()
    summary = run_pipeline(cfg, log=_say, new=new)
    _print_summary(cfg, summary, config)
    if summary.get("serve", {}).get("ray") == "in-process":
        _serve_forever(summary["serve"]["url"])


@app.command()
@handle_errors
def serve(
    config: ConfigArg,
    set_: SetOpt = None,
    model_uri: Annotated[str | None, typer.Option(help="Default: models:/NAME@champion.")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop this experiment's endpoint.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ray Serve: deploy the registered model behind HTTP on serve.host:serve.port."""
    cfg = _load(config, set_)
    _start_console("serve-stop" if stop else "serve", cfg, verbose)
    from lepton_ray.pipeline import run_serve_stage, run_serve_stop

    _quiet_libraries()
    if stop:
        if not run_serve_stop(cfg, log=_say):
            _say(f"no Serve application '{cfg.serve.app_name or cfg.name}' is running")
        return
    result = run_serve_stage(cfg, model_uri=model_uri, log=_say)
    _print_answers(cfg.serve.example_texts, result["answers"])
    _say(f"query it:  {_curl_hint(result['url'])}")
    if result["ray"] == "in-process":
        _serve_forever(result["url"])


@app.command()
@handle_errors
def predict(
    config: ConfigArg,
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to send to the running Serve endpoint.")
    ] = None,
    set_: SetOpt = None,
    url: Annotated[
        str | None, typer.Option(help="Default: from the config's serve section.")
    ] = None,
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json", help="JSON lines (text, label, probabilities, truncated), not a table."
        ),
    ] = False,
    input_: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="Offline, no endpoint: classify every row of this file, folder or glob (in "
            "the format and columns of the config's data section) with Ray Data.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="With --input: where the predictions go (.parquet, .csv or .jsonl)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="With --input: NAME@ALIAS, NAME/VERSION or models:/...; default: what serve "
            "deploys (@champion)."
        ),
    ] = None,
    id_column: Annotated[
        str | None,
        typer.Option(
            help="With --input: an input column to use as the row id (default: file:row)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="With --input: texts per forward pass.")] = 64,
    verbose: VerboseOpt = False,
) -> None:
    """Classify texts on the running Serve endpoint (a table, or --json lines), or, with
    --input and --output, a whole dataset offline with the registered model."""
    from lepton_ray.batch_predict import format_json_lines, format_table, run_batch_predict

    cfg = _load(config, set_)
    if input_ is None:
        _check_usage(
            texts, "give texts to classify, or --input FILE --output FILE", output, model, id_column
        )
        from lepton_ray.serve.client import api_key, endpoint_url
        from lepton_ray.serve.client import predict as http_predict

        answers = http_predict(url or endpoint_url(cfg), texts, key=api_key(cfg))
        _say((format_json_lines if json_lines else format_table)(texts, answers))
        return
    _check_usage(
        output, "--input needs --output FILE (.parquet, .csv or .jsonl)", texts, url, json_lines
    )
    _start_console("predict", cfg, verbose)
    _quiet_libraries()
    run_batch_predict(
        cfg, input_, output, model_spec=model, log=_say, id_column=id_column, batch_size=batch_size
    )


def _check_usage(needed, missing: str, *unwanted) -> None:
    """``predict``'s two modes: texts (the endpoint) or --input (offline), not a mix."""
    if any(value for value in unwanted):
        raise LeptonError(
            "predict takes either texts (sent to the endpoint; --url, --json) or --input "
            "(offline; --output, --model, --id-column), not both"
        )
    if not needed:
        raise LeptonError(missing)


@app.command()
@handle_errors
def ui(
    config: ConfigArg,
    set_: SetOpt = None,
    port: Annotated[int, typer.Option(help="Port of the MLflow UI on 127.0.0.1.")] = 5000,
) -> None:
    """Start the MLflow UI on the experiment's tracking store (127.0.0.1); print the links
    to the experiment's runs table and to its registered model."""
    cfg = _load(config, set_)
    base = f"http://127.0.0.1:{port}"
    _say(f"MLflow UI on {base} (Ctrl-C to stop)")
    for line in _ui_links(cfg, base, config):
        _say(f"  {line}")
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    cmd = [
        mlflow_bin,
        "ui",
        "--backend-store-uri",
        cfg.tracking.tracking_uri,
        "--default-artifact-root",
        cfg.tracking.artifact_location,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    os.execv(mlflow_bin, cmd)


UI_MACHINE_LEARNING = "workflowType=machine_learning"
"""MLflow 3's UI shows an experiment in its GenAI view (overview, traces, judges) unless the
page's workflow type is machine learning, whatever the experiment's kind tag says: the
switch in its sidebar (remembered per browser, GenAI by default) or this query parameter."""


def _ui_links(cfg, base: str, config: Path) -> list[str]:
    """The runs table of the experiment and its registered model, as links into the UI."""
    from urllib.parse import quote

    from mlflow.exceptions import MlflowException

    from lepton_ray.tracking.mlflow import client

    c = client(cfg.tracking.tracking_uri)
    experiment = c.get_experiment_by_name(cfg.name)
    if experiment is None:
        return [f"runs:  no experiment '{cfg.name}' in this store yet (lepton-ray run {config})"]
    links = [f"runs:  {base}/#/experiments/{experiment.experiment_id}/runs?{UI_MACHINE_LEARNING}"]
    name = cfg.registered_model_name
    try:
        c.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return [*links, f"model: no registered model '{name}' yet"]
    return [*links, f"model: {base}/#/models/{quote(name, safe='')}?{UI_MACHINE_LEARNING}"]


@app.command("sample-data")
@handle_errors
def sample_data(
    path: Annotated[Path, typer.Argument(help="CSV file to write.")],
    rows: Annotated[int, typer.Option(help="Clean rows before the dirty ones are added.")] = 1200,
    seed: int = 7,
) -> None:
    """Write the quickstart's review dataset (columns: review, sentiment)."""
    from lepton_ray.data.sample import write_reviews_csv

    _say(f"wrote {write_reviews_csv(path, rows, seed)}")


@cluster_app.command("up")
@handle_errors
def cluster_up(
    num_cpus: Annotated[int | None, typer.Option(help="Default: every core.")] = None,
    auth: Annotated[str, typer.Option(help="RAY_AUTH_MODE: disabled or token.")] = "disabled",
    serve_ingress: Annotated[
        str,
        typer.Option(
            help="Ray Serve's HTTP ingress: proxy, haproxy (faster; model swaps answer 404 "
            "for seconds) or auto."
        ),
    ] = "proxy",
    port: Annotated[int, typer.Option(help="The head's GCS port (its address).")] = 6379,
    dashboard_port: Annotated[
        int, typer.Option(help="The dashboard and Ray Jobs API port, on 127.0.0.1.")
    ] = 8265,
    verbose: VerboseOpt = False,
) -> None:
    """`ray start --head` on 127.0.0.1 (dashboard on 127.0.0.1:8265), recorded so that
    `cluster down` stops this cluster and no other Ray."""
    if auth not in ("disabled", "token"):
        raise LeptonError(f"--auth must be 'disabled' or 'token', got {auth!r}")
    if serve_ingress not in ("auto", "haproxy", "proxy"):
        raise LeptonError(
            f"--serve-ingress must be 'auto', 'haproxy' or 'proxy', got {serve_ingress!r}"
        )
    _start_console("cluster-up", None, verbose)
    from lepton_ray.runtime import cluster_up as start

    address = start(
        num_cpus,
        auth,
        serve_ingress=serve_ingress,
        port=port,
        dashboard_port=dashboard_port,
        log=_say,
    )
    _say(f"stop it with: lepton-ray cluster down   (address {address})")


@cluster_app.command("down")
@handle_errors
def cluster_down() -> None:
    """Stop the cluster `cluster up` started, and the Serve endpoint on it (no other Ray)."""
    from lepton_ray.runtime import cluster_down as stop

    stop(log=_say)


@cluster_app.command("status")
@handle_errors
def cluster_status() -> None:
    """Whether a local cluster is up."""
    from lepton_ray.runtime import local_cluster_address

    address = local_cluster_address()
    _say(f"running at {address}" if address else "no local cluster is running")
    if not address:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------- jobs
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
        _say(f"[jobs] {job_id} SUCCEEDED")
        return
    from lepton_ray.jobs import JobFailed, describe, first_line

    # Ray appends the log's tail to the message: the log was shown already (or is a command away).
    message = describe(jobs.info(job_id))["message"]
    message = first_line(message) if message.strip() else ""
    raise JobFailed(f"job {job_id} ended {status}{': ' + message if message else ''}")


@app.command()
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
    from lepton_ray.jobs import submit as send

    jobs, job_id = send(
        config, address, set_, auth, project, runtime_env, command=command, log=_say
    )
    if not follow:
        _say(f"follow it with: lepton-ray jobs logs {job_id} --follow --address {jobs.address}")
        return
    _job_result(job_id, jobs.follow(job_id, _write_raw), jobs)


@jobs_app.command("list")
@handle_errors
def jobs_list(
    address: AddressOpt = None,
    auth: AuthOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job.")] = False,
) -> None:
    """The cluster's jobs, newest first."""
    from lepton_ray.jobs import Jobs, describe

    rows = sorted(
        (describe(j) for j in Jobs(address, auth).list()), key=lambda r: r["started"], reverse=True
    )
    if as_json:
        for row in rows:
            _write_raw(json.dumps(row) + "\n")
        return
    if not rows:
        _say("no jobs on this cluster")
        return
    _say(f"{'ID':<44} {'STATUS':<10} {'EXPERIMENT':<20} {'STARTED':<19}  ENTRYPOINT")
    for r in rows:
        _say(
            f"{r['id']:<44} {r['status']:<10} {r['experiment'][:20]:<20} {r['started']:<19}  "
            f"{r['entrypoint']}"
        )


@jobs_app.command("status")
@handle_errors
def jobs_status(job_id: JobIdArg, address: AddressOpt = None, auth: AuthOpt = "auto") -> None:
    """One job's status (exit 0 when SUCCEEDED, 1 when it failed or stopped, 3 while running)."""
    from lepton_ray.jobs import Jobs, describe

    row = describe(Jobs(address, auth).info(job_id))
    _say(f"{row['id']}: {row['status']}" + (f" ({row['message']})" if row["message"] else ""))
    _say(f"  entrypoint: {row['entrypoint']}")
    if row["status"] in ("FAILED", "STOPPED"):
        raise typer.Exit(1)
    if row["status"] != "SUCCEEDED":
        raise typer.Exit(3)


@jobs_app.command("logs")
@handle_errors
def jobs_logs(
    job_id: JobIdArg,
    address: AddressOpt = None,
    auth: AuthOpt = "auto",
    follow: FollowOpt = False,
) -> None:
    """A job's output (the driver's stdout and stderr)."""
    from lepton_ray.jobs import Jobs

    jobs = Jobs(address, auth)
    if follow:
        _job_result(job_id, jobs.follow(job_id, _write_raw), jobs)
    else:
        _write_raw(jobs.logs(job_id))


@jobs_app.command("stop")
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
    from lepton_ray.jobs import TERMINAL, Jobs

    jobs = Jobs(address, auth)
    if not jobs.stop(job_id):
        _say(f"{job_id} had already ended ({jobs.status(job_id)})")
        return
    status = jobs.wait(job_id, timeout_s=wait_s) if wait_s > 0 else jobs.status(job_id)
    _say(f"{job_id}: {status}" + ("" if status in TERMINAL else " (stop requested)"))


def _promoted(result: dict) -> str:
    if "promoted" not in result:
        return ""
    return ", promoted to @champion" if result["promoted"] else ", not promoted (see above)"


# ------------------------------------------------------------------------------- models
ModelsConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Experiment YAML: its tracking store, gate tolerance and validation split.",
    ),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: --config's, else $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlruns/mlflow.db).",
    ),
]


def _registry_target(config: Path | None, tracking_uri: str | None):
    """(tracking URI, config or None) for a ``models`` command."""
    cfg = _load(config, None) if config is not None else None
    if tracking_uri:
        from lepton_ray.config import TrackingSection

        uri = TrackingSection(tracking_uri=tracking_uri).tracking_uri
    elif cfg is not None:
        uri = cfg.tracking.tracking_uri
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    else:
        from lepton_ray.config import TrackingSection

        uri = TrackingSection().tracking_uri
    return uri, cfg


@models_app.command("list")
@handle_errors
def models_list(
    name: Annotated[str | None, typer.Argument(help="A registered model; default: all.")] = None,
    config: ModelsConfigOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Every registered version, newest first, with aliases, quantization and metric."""
    from lepton_ray import registry

    uri, _ = _registry_target(config, tracking_uri)
    rows = registry.list_versions(uri, name)
    if not rows:
        _say("no registered models")
        return
    _say(
        f"{'model':<24} {'ver':>4}  {'aliases':<22} {'quantization':<14} {'peft':<6} {'metric':<22} run"
    )
    for r in rows:
        metric_name = r["lineage"].get(registry.TAG_METRIC_NAME, "val_accuracy")
        value = r["metrics"].get(metric_name)
        metric = f"{metric_name}={value}" if value is not None else "-"
        _say(
            f"{r['name']:<24} {r['version']:>4}  {','.join('@' + a for a in r['aliases']) or '-':<22} "
            f"{r['quantization']:<14} {r['peft_method'] or '-':<6} {metric:<22} {r['run_id'] or '-'}"
        )


@models_app.command("show")
@handle_errors
def models_show(
    spec: Annotated[
        str, typer.Argument(help="NAME (= NAME@champion), NAME@ALIAS or NAME/VERSION.")
    ],
    config: ModelsConfigOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """One version: aliases, metrics and lineage tags, as JSON."""
    from lepton_ray import registry

    uri, _ = _registry_target(config, tracking_uri)
    version = registry.resolve(uri, spec)
    aliases = [
        a
        for a, v in (registry.registered_model(uri, version.name).aliases or {}).items()
        if str(v) == str(version.version)
    ]
    info = registry.describe(version, sorted(aliases))
    info["model_uri"] = f"models:/{version.name}/{version.version}"
    _say(json.dumps(info, indent=2, default=str))


@models_app.command("promote")
@handle_errors
def models_promote(
    spec: Annotated[str, typer.Argument(help="NAME/VERSION or NAME@ALIAS (e.g. NAME@challenger).")],
    config: ModelsConfigOpt = None,
    tracking_uri: TrackingOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Skip the gate.")] = False,
    tolerance: Annotated[
        float | None,
        typer.Option(help="Gate tolerance (default: --config's registry.tolerance, else 0)."),
    ] = None,
) -> None:
    """Make a version the @champion if its validation metric passes the gate."""
    from lepton_ray import registry

    uri, cfg = _registry_target(config, tracking_uri)
    if tolerance is not None and tolerance < 0:
        raise LeptonError(f"--tolerance must be >= 0, got {tolerance}")
    version = registry.resolve(uri, spec)
    evaluate = None
    if cfg is not None:
        from lepton_ray.pipeline import validation_metric

        evaluate = functools.partial(validation_metric, cfg)
    if tolerance is None:
        tolerance = cfg.registry.tolerance if cfg is not None else 0.0
    result = registry.promote(
        uri,
        version.name,
        str(version.version),
        tolerance=tolerance,
        force=force,
        evaluate=evaluate,
        log=_say,
    )
    if not result.passed:
        _fail(f"not promoted: {result.reason}", 1)


@models_app.command("rollback")
@handle_errors
def models_rollback(
    name: Annotated[str, typer.Argument(help="A registered model.")],
    config: ModelsConfigOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point @champion back at the previous champion."""
    from lepton_ray import registry

    uri, _ = _registry_target(config, tracking_uri)
    registry.rollback(uri, name, log=_say)


def _print_answers(texts: list[str], answers: list[dict]) -> None:
    for text, answer in zip(texts, answers):
        _say(f"  {text!r:<60} -> {answer['label']} {json.dumps(answer['probabilities'])}")


def _curl_hint(url: str) -> str:
    body = '{"texts": ["The lamp works perfectly."]}'
    return f"curl -s -X POST {url}/v1/predict -H 'Content-Type: application/json' -d '{body}'"


def _print_summary(cfg, summary: dict, config: Path) -> None:
    best = summary.get("best", {})
    _say("")
    _say(f"== {cfg.name}: done in {summary.get('seconds', 0):.0f} s ==")
    if best:
        _say(
            f"best run      {best['run_id']} (registered as {cfg.registered_model_name} v{best['version']})"
        )
    comp = summary.get("compress")
    if comp:
        m = comp["metrics"]
        sizes = f"{m.get('size_mb_fp32', float('nan')):.1f} MB -> {m.get('size_mb_compressed', float('nan')):.1f} MB"
        accs = (
            f"val accuracy {m.get('val_accuracy_fp32', float('nan')):.4f} -> "
            f"{m.get('val_accuracy_compressed', float('nan')):.4f}"
        )
        if comp["compressed_version"] is not None:
            _say(f"compressed    v{comp['compressed_version']} ({comp['method']}): {sizes}, {accs}")
        else:
            _say(f"compressed    refused: {comp['reason']}")
    if "candidate_version" in summary:
        state = "promoted to @champion" if summary.get("promoted") else "not promoted (gate)"
        _say(f"candidate     v{summary['candidate_version']}: {state}")
    srv = summary.get("serve")
    if srv:
        _say(f"serving       {srv['model_uri']} at {srv['url']}/v1/predict")
        _print_answers(cfg.serve.example_texts, srv["answers"])
        _say(f"query it:     {_curl_hint(srv['url'])}")
    _say(f"MLflow UI:    lepton-ray ui {config}   (it prints the runs table's link)")


def _serve_forever(url: str) -> None:
    _say(
        f"serving from this process's Ray instance at {url}; Ctrl-C stops it "
        "(start a cluster with `lepton-ray cluster up` to keep it running in the background)"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _say("stopped")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
