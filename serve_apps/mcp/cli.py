"""`solanalm mcp`: the MCP server over stdio, for MCP clients that spawn it (Claude Desktop, IDEs, agents).

It talks to a gateway over HTTP with an API key (inference is metered like any request) and to the
cluster's Ray job server (training, sharding), with the cluster's token found as `solanalm ray-env` finds it.
"""

import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="MCP server (stdio): inference, training and sharding tools; network resources.")


@app.callback(invoke_without_command=True)
def mcp(
    url: Annotated[
        str | None, typer.Option(help="Gateway base URL (default: http://127.0.0.1:<http.port>/v1).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SOLANALM_API_KEY", help="API key (sk-...) for a paid gateway.")
    ] = None,
    jobs_address: Annotated[
        str | None,
        typer.Option(help="Ray job server (default: RAY_ADDRESS if http, else http://127.0.0.1:<ray.dashboard_port>)."),
    ] = None,
    working_dir: Annotated[
        Path, typer.Option(file_okay=False, exists=True, help="Uploaded as the jobs' working directory.")
    ] = Path("."),
) -> None:
    """Serve MCP on stdin/stdout until the client closes it."""
    from cluster.config import Settings
    from cluster.security.ray_auth import apply_to_process, driver_env
    from serve_apps.mcp.access import HttpGatewayAccess
    from serve_apps.mcp.jobs import JobsConfig, TrainingJobs
    from serve_apps.mcp.server import build_mcp_server

    settings = Settings()
    base_url = url or f"http://127.0.0.1:{settings.http.port}/v1"
    if jobs_address is None:
        env = os.environ.get("RAY_ADDRESS", "")
        jobs_address = env if env.startswith("http") else f"http://127.0.0.1:{settings.ray.dashboard_port}"
    try:  # the cluster's token for the job server (nothing is set when none is found)
        apply_to_process(driver_env(settings.ray, settings.model.cache_dir / "state"))
    except RuntimeError as exc:
        typer.echo(f"solanalm mcp: {exc}", err=True)
        raise typer.Exit(1) from None
    address = jobs_address
    jobs = TrainingJobs(JobsConfig(lambda: address, working_dir.resolve(), settings.training.output_dir))
    build_mcp_server(HttpGatewayAccess(base_url, api_key), jobs).run("stdio")
