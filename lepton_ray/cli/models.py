"""``lepton-ray models``: the model registry; list, show, promote and roll back versions."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from lepton_ray.cli.common import _load, fail, handle_errors, say
from lepton_ray.errors import LeptonError

app = typer.Typer(
    no_args_is_help=True,
    help="The model registry: list, show, promote and roll back versions (@champion is served).",
)

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


@app.command("list")
@handle_errors
def models_list(
    name: Annotated[str | None, typer.Argument(help="A registered model; default: all.")] = None,
    config: ModelsConfigOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Every registered version, newest first, with aliases, quantization and metric."""
    from lepton_ray.registry import versions

    uri, _ = _registry_target(config, tracking_uri)
    rows = versions.list_versions(uri, name)
    if not rows:
        say("no registered models")
        return
    say(
        f"{'model':<24} {'ver':>4}  {'aliases':<22} {'quantization':<14} {'peft':<6} {'metric':<22} run"
    )
    for r in rows:
        metric_name = r["lineage"].get(versions.TAG_METRIC_NAME, "val_accuracy")
        value = r["metrics"].get(metric_name)
        metric = f"{metric_name}={value}" if value is not None else "-"
        say(
            f"{r['name']:<24} {r['version']:>4}  {','.join('@' + a for a in r['aliases']) or '-':<22} "
            f"{r['quantization']:<14} {r['peft_method'] or '-':<6} {metric:<22} {r['run_id'] or '-'}"
        )


@app.command("show")
@handle_errors
def models_show(
    spec: Annotated[
        str, typer.Argument(help="NAME (= NAME@champion), NAME@ALIAS or NAME/VERSION.")
    ],
    config: ModelsConfigOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """One version: aliases, metrics and lineage tags, as JSON."""
    from lepton_ray.registry import versions

    uri, _ = _registry_target(config, tracking_uri)
    version = versions.resolve(uri, spec)
    aliases = [
        a
        for a, v in (versions.registered_model(uri, version.name).aliases or {}).items()
        if str(v) == str(version.version)
    ]
    info = versions.describe(version, sorted(aliases))
    info["model_uri"] = f"models:/{version.name}/{version.version}"
    say(json.dumps(info, indent=2, default=str))


@app.command("promote")
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
    from lepton_ray.registry import versions

    uri, cfg = _registry_target(config, tracking_uri)
    if tolerance is not None and tolerance < 0:
        raise LeptonError(f"--tolerance must be >= 0, got {tolerance}")
    version = versions.resolve(uri, spec)
    evaluate = None
    if cfg is not None:
        from lepton_ray.registry.gate import validation_metric

        evaluate = functools.partial(validation_metric, cfg)
    if tolerance is None:
        tolerance = cfg.registry.tolerance if cfg is not None else 0.0
    result = versions.promote(
        uri,
        version.name,
        str(version.version),
        tolerance=tolerance,
        force=force,
        evaluate=evaluate,
        log=say,
    )
    if not result.passed:
        fail(f"not promoted: {result.reason}", 1)


@app.command("rollback")
@handle_errors
def models_rollback(
    name: Annotated[str, typer.Argument(help="A registered model.")],
    config: ModelsConfigOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Point @champion back at the previous champion."""
    from lepton_ray.registry import versions

    uri, _ = _registry_target(config, tracking_uri)
    versions.rollback(uri, name, log=say)
