"""The ``lepton-ray`` command line. Thin: parse, load the config, call one ``run_*``, print.

One module per command group: ``run`` (an experiment's stages, ``ui``, ``sample-data``),
``jobs`` (``submit`` and ``jobs``), ``cluster``, ``models``; ``common`` holds what they share.
Heavy libraries (torch, ray, transformers, mlflow) are imported inside the commands, so
``lepton-ray --help`` answers at once.
"""

from __future__ import annotations

from typing import Annotated

import typer

from lepton_ray.cli import cluster, common, jobs, models, run

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="lepton-ray: fine-tune, sweep, track, compress and serve Hugging Face models on Ray, "
    "one YAML file per experiment.",
)
# The root's own commands in the order --help lists them (the stages, then submit); the groups.
app.registered_commands += run.root.registered_commands + jobs.root.registered_commands
app.add_typer(cluster.app, name="cluster")
app.add_typer(models.app, name="models")
app.add_typer(jobs.app, name="jobs")


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
    common._OPTIONS["verbose"] = verbose


def main() -> None:
    app()
