"""`solanalm node ...`: join the provider network with a wallet, leave it, list the registry's nodes."""

from pathlib import Path
from typing import Annotated, Any

import ray
import typer
from rich.console import Console
from rich.table import Table

from cluster.config import Settings, load_settings
from cluster.config.network import NetworkSection
from cluster.network import join as joining
from cluster.network.records import NodeRecord
from cluster.network.registry import get_or_create_registry, get_registry
from cluster.network.wallet import ProofError

app = typer.Typer(help="Provider nodes: join with a wallet, leave, list.", no_args_is_help=True)
console = Console()
DEFAULT_STATE_FILE = Path("~/.local/state/solanalm/node.json")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Settings YAML; env SOLANALM_* overrides.")]


def network_section(settings: Settings) -> NetworkSection:
    """The `network` section (defaults until the root Settings carries one)."""
    section = getattr(settings, "network", None)
    return section if isinstance(section, NetworkSection) else NetworkSection()


def _parse_labels(pairs: list[str] | None) -> dict[str, str]:
    labels = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {pair!r}")
        labels[key] = value
    return labels


@app.command("join")
def join_command(
    address: Annotated[str, typer.Option(help="GCS address of the network's head (host:6379).")],
    wallet: Annotated[Path, typer.Option(help="Solana CLI keypair file (JSON array of 64 bytes).")],
    region: Annotated[str, typer.Option(help="Region label, e.g. eu-west.")] = "",
    label: Annotated[list[str] | None, typer.Option(help="Extra node label key=value (repeatable).")] = None,
    num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs offered (default: all).")] = None,
    num_gpus: Annotated[int | None, typer.Option(min=0, help="GPUs offered (default: all).")] = None,
    state_file: Annotated[Path, typer.Option(help="Where the node id is kept for `leave`.")] = DEFAULT_STATE_FILE,
    config: ConfigOpt = None,
) -> None:
    """Start a labelled Ray worker node here, prove the wallet to the registry, and register."""
    settings = load_settings(config)
    try:
        node, record = joining.join(
            address,
            wallet,
            network_section(settings),
            settings.ray.namespace,
            region,
            _parse_labels(label),
            num_cpus,
            num_gpus,
        )
    except (joining.JoinError, ProofError) as exc:
        console.print(f"[red]join failed:[/] {exc}")
        raise typer.Exit(1) from exc
    joining.write_state(state_file.expanduser(), node)
    console.print(
        f"[green]joined[/] node {node.node_id} for wallet {node.wallet} "
        f"(reputation {record.reputation:.2f}, {record.capabilities.throughput_gflops:.1f} GFLOP/s)"
    )


@app.command("leave")
def leave_command(
    state_file: Annotated[Path, typer.Option(help="The state file `join` wrote.")] = DEFAULT_STATE_FILE,
    config: ConfigOpt = None,
) -> None:
    """Mark this node draining, wait for its stages to move, then stop its Ray node."""
    settings = load_settings(config)
    try:
        node = joining.read_state(state_file.expanduser())
        drained = joining.leave(node, network_section(settings), settings.ray.namespace)
    except (joining.JoinError, ValueError) as exc:
        console.print(f"[red]leave failed:[/] {exc}")
        raise typer.Exit(1) from exc
    state_file.expanduser().unlink(missing_ok=True)
    console.print(f"[green]left[/] ({'drained' if drained else 'drain timed out'})")


@app.command("list")
def list_command(
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: settings).")] = None,
    config: ConfigOpt = None,
) -> None:
    """The registry's nodes: wallet, region, health, counters, reputation."""
    settings = load_settings(config)
    _connect(address or settings.ray.address or "auto", settings)
    section = network_section(settings)
    try:
        registry = get_registry(section, settings.ray.namespace)
    except ValueError:
        console.print("[yellow]no registry is running[/] (start it with `solanalm node registry`)")
        raise typer.Exit(1) from None
    records: list[NodeRecord] = ray.get(registry.list_nodes.remote(), timeout=section.registry_call_timeout_s)
    console.print(nodes_table(records))


@app.command("registry")
def registry_command(
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: settings).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Start the registry actor on the cluster if it is not running (operator, once per cluster)."""
    settings = load_settings(config)
    _connect(address or settings.ray.address or "auto", settings)
    section = network_section(settings)
    registry = get_or_create_registry(section, settings.ray.namespace)
    count: Any = ray.get(registry.ping.remote(), timeout=section.registry_call_timeout_s)
    console.print(f"[green]registry[/] {section.registry_name} running with {count} node records")


@app.command("plan")
def plan_command(
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: settings).")] = None,
    model: Annotated[
        list[str] | None, typer.Option(help="Catalogue name to plan (repeatable; default: served).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Dry run: how `solanalm up` would place each model's stages over the registry's eligible nodes."""
    from cluster.deploy import plan_deployment
    from cluster.network.placement import PlacementError
    from cluster.network.serving_plan import describe_plan

    settings = load_settings(config)
    if model:
        settings.model.served = model
    _connect(address or settings.ray.address or "auto", settings)
    try:
        plans = plan_deployment(settings)
    except PlacementError as exc:
        console.print(f"[red]no placement:[/] {exc}")
        raise typer.Exit(1) from exc
    if not plans:
        console.print("no registry or no eligible provider node: `solanalm up` splits layers equally on the cluster")
    for name, plan in plans.items():
        console.print(f"[bold]{name}[/] {describe_plan(plan)}")


def nodes_table(records: list[NodeRecord]) -> Table:
    """A rich table of node records (also what `solanalm status` can show)."""
    table = Table(title="Provider nodes")
    for column in (
        "node",
        "wallet",
        "region",
        "health",
        "CPU",
        "GPU",
        "GFLOP/s",
        "served",
        "failed",
        "checks ok/bad",
        "latency s",
        "reputation",
    ):
        table.add_column(column)
    for r in records:
        latency = f"{r.latency_ewma_s:.3f}" if r.latency_ewma_s is not None else "-"
        table.add_row(
            r.node_id[:12],
            r.wallet[:8] + "...",
            r.region or "-",
            r.health,
            f"{r.capabilities.num_cpus:g}",
            f"{r.capabilities.num_gpus:g}",
            f"{r.capabilities.throughput_gflops:.1f}",
            str(r.requests_served),
            str(r.failures),
            f"{r.verifications_passed}/{r.verifications_failed}",
            latency,
            f"{r.reputation:.2f}",
        )
    return table


def _connect(address: str, settings: Settings) -> Any:
    """Join the operator's cluster as its operator: with its token (and TLS files), as `solanalm status` does."""
    if not ray.is_initialized():
        from cluster.ray_cluster import prepare_driver

        prepare_driver(settings.ray, settings.model.cache_dir / "state")
        namespace = settings.ray.namespace
        ray.init(address=address, namespace=namespace, log_to_driver=False, configure_logging=False)
