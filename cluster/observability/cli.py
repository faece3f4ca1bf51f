"""`solanalm grafana ...`: a CLI plugin (entry-point group `solanalm.commands`)."""

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cluster.observability.grafana import DASHBOARDS_DIR, ProvisionError, load_dashboards, provision

app = typer.Typer(help="Grafana dashboards for SolanaLM's metrics.", no_args_is_help=True)
console = Console()


@app.callback()
def grafana() -> None:
    """Grafana dashboards for SolanaLM's metrics (Ray's Prometheus export)."""


@app.command("provision")
def provision_command(
    url: Annotated[str, typer.Option(help="Grafana base URL, e.g. http://127.0.0.1:3000.")],
    token: Annotated[
        str | None,
        typer.Option(help="Service-account token (default: $GRAFANA_TOKEN; or user:password inside --url)."),
    ] = None,
    prometheus_url: Annotated[
        str, typer.Option(help="Prometheus URL as Grafana's server reaches it (the datasource).")
    ] = "http://127.0.0.1:9090",
    dashboards_dir: Annotated[Path, typer.Option(help="Directory of dashboard JSON files.")] = DASHBOARDS_DIR,
    timeout_s: Annotated[float, typer.Option(min=0.1, max=600, help="Timeout of each Grafana call.")] = 10.0,
) -> None:
    """Create or update the Prometheus datasource, the SolanaLM folder and the dashboards."""
    from grafana_client import GrafanaApi

    try:
        dashboards = load_dashboards(dashboards_dir)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    api = GrafanaApi.from_url(url, credential=token or os.environ.get("GRAFANA_TOKEN"), timeout=timeout_s)
    try:
        result = provision(api, prometheus_url, dashboards)
    except ProvisionError as exc:
        _fail(f"{exc} (url {url})")
    action = "created" if result.datasource_created else "updated"
    console.print(f"datasource [bold]{result.datasource_uid}[/] {action} -> {prometheus_url}")
    for board in result.dashboards:
        console.print(f"dashboard {board}")


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code=1)
