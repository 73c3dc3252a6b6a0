"""``lepton-ray run`` and the other commands that run an experiment's stages: validate,
preprocess, train, tune, compress, retrain, serve, predict; ui and sample-data."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from lepton_ray import console
from lepton_ray.cli.common import (
    ConfigArg,
    SetOpt,
    VerboseOpt,
    _load,
    handle_errors,
    say,
    start_console,
)
from lepton_ray.errors import LeptonError

root = typer.Typer()
"""These commands sit on the root app: ``lepton_ray.cli`` adds them there."""

NewOpt = Annotated[
    bool,
    typer.Option(
        "--new",
        help="Start training afresh instead of resuming this experiment's unfinished run.",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue this config's interrupted sweep: finished trials are kept, "
        "unfinished ones restart from their latest checkpoint.",
    ),
]


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


@root.command()
@handle_errors
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config (keys, types, ranges, files, PEFT targets, object-store buckets) without
    running anything."""
    cfg = _load(config, set_)
    from lepton_ray.train.peft import check_targets_early

    check_targets_early(cfg)
    from lepton_ray.train.distill import check_distill_early

    check_distill_early(cfg, log=say)
    from lepton_ray.runtime.storage import check_storage

    check_storage(cfg, log=say)
    say(
        f"ok: {config} is a valid '{cfg.task}' experiment named '{cfg.name}' "
        f"(config hash {cfg.fingerprint()})"
    )


@root.command()
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
    start_console("preprocess", cfg, verbose)
    from lepton_ray.data.report import summary_table
    from lepton_ray.pipeline import run_preprocess_stage

    _quiet_libraries()
    manifest = run_preprocess_stage(cfg, log=say, force=force)
    say(summary_table(manifest))


@root.command()
@handle_errors
def train(
    config: ConfigArg, set_: SetOpt = None, verbose: VerboseOpt = False, new: NewOpt = False
) -> None:
    """Ray Train: fine-tune with the config's values; register the model (@challenger) and
    promote it to @champion if the registry gate passes.

    Re-running the same command after a crash resumes from the latest checkpoint."""
    cfg = _load(config, set_)
    start_console("train", cfg, verbose)
    from lepton_ray.pipeline import run_train_stage

    _quiet_libraries()
    best = run_train_stage(cfg, log=say, new=new)
    say(f"done: run {best['run_id']}, registered version {best['version']}{_promoted(best)}")


@root.command()
@handle_errors
def tune(
    config: ConfigArg,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """Ray Tune + Optuna sweep (tune.search, tune.scheduler); register the best trial's
    model, promote it if gated in, and print its config as YAML."""
    cfg = _load(config, set_)
    start_console("tune", cfg, verbose)
    from lepton_ray.pipeline import run_tune_stage

    _quiet_libraries()
    best = run_tune_stage(cfg, log=say, resume=resume)
    say(f"done: best run {best['run_id']}, registered version {best['version']}{_promoted(best)}")


@root.command()
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
    start_console("compress", cfg, verbose)
    from lepton_ray.pipeline import run_compress_stage

    _quiet_libraries()
    result = run_compress_stage(cfg, model_uri=model_uri, log=say)
    if result["compressed_version"] is None:
        say(f"done: compression refused ({result['reason']})")
    else:
        say(f"done: registered version {result['version']}{_promoted(result)}")


@root.command()
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
    start_console("retrain", cfg, verbose)
    from lepton_ray.registry.retrain import run_retrain

    _quiet_libraries()
    summary = run_retrain(cfg, data, source_spec=from_, replay=replay, log=say, swap=not no_swap)
    served = summary.get("serve")
    tail = f"; the endpoint now serves {served['model_uri']}" if served else ""
    verdict = "promoted to @champion" if summary["promoted"] else "not promoted (stays @challenger)"
    say(
        f"done: v{summary['candidate_version']} (continued from v{summary['source_version']}, "
        f"{summary['replay_rows']} replayed rows) {verdict}{tail}"
    )
    if not summary["promoted"]:
        raise typer.Exit(1)


@root.command()
@handle_errors
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    new: NewOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """Every stage in order: preprocess, train/tune, register, compress, serve."""
    cfg = _load(config, set_)
    start_console("run", cfg, verbose)
    from lepton_ray.pipeline import run as run_pipeline

    _quiet_libraries()
    summary = run_pipeline(cfg, log=say, new=new, resume=resume)
    _print_summary(cfg, summary, config)
    if summary.get("serve", {}).get("ray") == "in-process":
        _serve_forever(summary["serve"]["url"])


@root.command()
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
    start_console("serve-stop" if stop else "serve", cfg, verbose)
    from lepton_ray.pipeline import run_serve_stage, run_serve_stop

    _quiet_libraries()
    if stop:
        if not run_serve_stop(cfg, log=say):
            say(f"no Serve application '{cfg.serve.app_name or cfg.name}' is running")
        return
    result = run_serve_stage(cfg, model_uri=model_uri, log=say)
    _print_answers(cfg.serve.example_texts, result["answers"])
    say(f"query it:  {_curl_hint(result['url'], cfg)}")
    if result["ray"] == "in-process":
        _serve_forever(result["url"])


@root.command()
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
    batch_size: Annotated[
        int,
        typer.Option(
            help="With --input: texts per forward pass (a language model: decoded together)."
        ),
    ] = 64,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help="Language model, --input: tokens to generate at most (default: serve.default_max_tokens)."
        ),
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(help="Language model, --input: 0 is greedy (the endpoint's default is 1)."),
    ] = 1.0,
    top_p: Annotated[
        float, typer.Option(help="Language model, --input: nucleus sampling mass.")
    ] = 1.0,
    stop: Annotated[
        list[str] | None, typer.Option(help="Language model, --input: a stop string (repeatable).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Language model, --input: sampling seed (each row's own).")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Classify texts on the running Serve endpoint (a table, or --json lines), or, with
    --input and --output, predict for a whole dataset offline with the registered model (a
    language model generates for each prompt, as the endpoint would)."""
    from lepton_ray.batch_predict import format_json_lines, format_table, run_batch_predict
    from lepton_ray.tasks import get_task

    cfg = _load(config, set_)
    if input_ is None:
        _check_usage(
            texts, "give texts to classify, or --input FILE --output FILE", output, model, id_column
        )
        from lepton_ray.serve.client import api_key, endpoint_url
        from lepton_ray.serve.client import predict as http_predict

        answers = http_predict(url or endpoint_url(cfg), texts, key=api_key(cfg))
        if json_lines:
            say(format_json_lines(texts, answers))
        else:
            say(format_table(texts, answers, get_task(cfg.task)))
        return
    _check_usage(
        output, "--input needs --output FILE (.parquet, .csv or .jsonl)", texts, url, json_lines
    )
    start_console("predict", cfg, verbose)
    _quiet_libraries()
    limit = cfg.serve.max_tokens_limit
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise LeptonError(f"--max-tokens must be between 1 and serve.max_tokens_limit ({limit})")
    if not 0.0 <= temperature <= 2.0 or not 0.0 < top_p <= 1.0:
        raise LeptonError("--temperature must be in [0, 2] and --top-p in (0, 1]")
    sampling = {
        "max_tokens": max_tokens or min(cfg.serve.default_max_tokens, limit),
        "temperature": temperature,
        "top_p": top_p,
        "stop": tuple(s for s in stop or [] if s),
        "seed": seed,
    }
    run_batch_predict(
        cfg,
        input_,
        output,
        model_spec=model,
        log=say,
        id_column=id_column,
        batch_size=batch_size,
        sampling=sampling,
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


@root.command()
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
    say(f"MLflow UI on {base} (Ctrl-C to stop)")
    for line in _ui_links(cfg, base, config):
        say(f"  {line}")
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
        # One user on a laptop: one worker starts in seconds where MLflow's default four
        # take minutes on two loaded cores.
        "--workers",
        "1",
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


@root.command("sample-data")
@handle_errors
def sample_data(
    path: Annotated[Path, typer.Argument(help="CSV file to write.")],
    rows: Annotated[int, typer.Option(help="Clean rows before the dirty ones are added.")] = 1200,
    seed: int = 7,
) -> None:
    """Write the quickstart's review dataset (columns: review, sentiment)."""
    from lepton_ray.data.sample import write_reviews_csv

    say(f"wrote {write_reviews_csv(path, rows, seed)}")


def _promoted(result: dict) -> str:
    if "promoted" not in result:
        return ""
    return ", promoted to @champion" if result["promoted"] else ", not promoted (see above)"


def _print_answers(texts: list[str], answers: list[dict]) -> None:
    for text, answer in zip(texts, answers):
        if "text" in answer:  # a language model's answer
            say(f"  {text!r:<60} -> {answer['text']!r}")
        else:
            say(f"  {text!r:<60} -> {answer['label']} {json.dumps(answer['probabilities'])}")


def _curl_hint(url: str, cfg) -> str:
    from lepton_ray.serve.client import generates

    if generates(cfg):
        body = '{"messages": [{"role": "user", "content": "Say hello."}], "stream": true}'
        return (
            f"curl -N -X POST {url}/v1/chat/completions "
            f"-H 'Content-Type: application/json' -d '{body}'"
        )
    body = '{"texts": ["The lamp works perfectly."]}'
    return f"curl -s -X POST {url}/v1/predict -H 'Content-Type: application/json' -d '{body}'"


def _print_summary(cfg, summary: dict, config: Path) -> None:
    best = summary.get("best", {})
    say("")
    say(f"== {cfg.name}: done in {summary.get('seconds', 0):.0f} s ==")
    if best:
        say(
            f"best run      {best['run_id']} (registered as {cfg.registered_model_name} v{best['version']})"
        )
    comp = summary.get("compress")
    if comp:
        m = comp["metrics"]
        sizes = f"{m.get('size_mb_fp32', float('nan')):.1f} MB -> {m.get('size_mb_compressed', float('nan')):.1f} MB"
        # The score the compression was judged on: the sweep's metric where compress
        # measured it, else the task's headline (accuracy, or a language model's perplexity).
        names = (cfg.tune.metric, "val_accuracy", "val_perplexity")
        name = next((n for n in names if f"{n}_fp32" in m), "val_accuracy")
        accs = (
            f"{name.replace('_', ' ')} {m.get(f'{name}_fp32', float('nan')):.4f} -> "
            f"{m.get(f'{name}_compressed', float('nan')):.4f}"
        )
        if comp["compressed_version"] is not None:
            say(f"compressed    v{comp['compressed_version']} ({comp['method']}): {sizes}, {accs}")
        else:
            say(f"compressed    refused: {comp['reason']}")
    if "candidate_version" in summary:
        state = "promoted to @champion" if summary.get("promoted") else "not promoted (gate)"
        say(f"candidate     v{summary['candidate_version']}: {state}")
    srv = summary.get("serve")
    if srv:
        from lepton_ray.serve.client import route

        say(f"serving       {srv['model_uri']} at {srv['url']}{route(cfg)}")
        _print_answers(cfg.serve.example_texts, srv["answers"])
        say(f"query it:     {_curl_hint(srv['url'], cfg)}")
    say(f"MLflow UI:    lepton-ray ui {config}   (it prints the runs table's link)")


def _serve_forever(url: str) -> None:
    say(
        f"serving from this process's Ray instance at {url}; Ctrl-C stops it "
        "(start a cluster with `lepton-ray cluster up` to keep it running in the background)"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopped")
