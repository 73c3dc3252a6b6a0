"""``lepton-ray cluster``: start, stop or inspect a local Ray cluster."""

from __future__ import annotations

from typing import Annotated

import typer

from lepton_ray.cli.common import VerboseOpt, handle_errors, say, start_console
from lepton_ray.errors import LeptonError

app = typer.Typer(no_args_is_help=True, help="Start, stop or inspect a local Ray cluster.")


@app.command("up")
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
    start_console("cluster-up", None, verbose)
    from lepton_ray.runtime.cluster import cluster_up as start

    address = start(
        num_cpus,
        auth,
        serve_ingress=serve_ingress,
        port=port,
        dashboard_port=dashboard_port,
        log=say,
    )
    say(f"stop it with: lepton-ray cluster down   (address {address})")


@app.command("down")
@handle_errors
def cluster_down() -> None:
    """Stop the cluster `cluster up` started, and the Serve endpoint on it (no other Ray)."""
    from lepton_ray.runtime.cluster import cluster_down as stop

    stop(log=say)


@app.command("status")
@handle_errors
def cluster_status() -> None:
    """Whether a local cluster is up."""
    from lepton_ray.runtime.cluster import local_cluster_address

    address = local_cluster_address()
    say(f"running at {address}" if address else "no local cluster is running")
    if not address:
        raise typer.Exit(1)
