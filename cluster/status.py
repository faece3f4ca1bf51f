"""`solanalm status`: nodes, Serve deployments, and where every pipeline stage runs."""

from dataclasses import dataclass

import ray
from rich.console import Console
from rich.table import Table

from cluster.config.network import NetworkSection

STAGE_PREFIX = "stage:"


@dataclass(frozen=True, slots=True)
class StageName:
    """Parsed stage actor name `stage:<model>:<replica actor id>:<index>:<start>-<end>`."""

    model: str
    replica: str
    index: int
    layers: str
    full: str
    namespace: str

    @classmethod
    def parse(cls, name: str, namespace: str) -> "StageName | None":
        parts = name.split(":")
        if len(parts) != 5 or parts[0] != "stage" or not parts[3].isdigit():
            return None
        return cls(parts[1], parts[2], int(parts[3]), parts[4], name, namespace)


def render_status(console: Console, network: NetworkSection, namespace: str) -> None:
    console.print(_nodes_table())
    console.print(_providers(network, namespace))
    console.print(_serve_table())
    console.print(_stages_table())


def _providers(network: NetworkSection, namespace: str) -> Table | str:
    """The registry's provider nodes (wallet, health, reputation), when a registry runs."""
    from cluster.network.cli import nodes_table
    from cluster.network.registry import call_registry, get_registry

    try:
        registry = get_registry(network, namespace)
    except ValueError:
        return "no provider registry is running (`solanalm node registry` starts one)"
    return nodes_table(call_registry(registry, "list_nodes", timeout_s=network.registry_call_timeout_s))


def _nodes_table() -> Table:
    table = Table(title="Ray nodes")
    for column in ("node", "alive", "address", "CPU", "GPU", "memory GiB", "labels"):
        table.add_column(column)
    for node in ray.nodes():
        res = node.get("Resources", {})
        labels = node.get("Labels") or {}
        shown = ", ".join(f"{k}={v}" for k, v in labels.items() if not k.startswith("ray.io/"))
        table.add_row(
            node["NodeID"][:12],
            str(node["Alive"]),
            node.get("NodeManagerAddress", ""),
            f"{res.get('CPU', 0):g}",
            f"{res.get('GPU', 0):g}",
            f"{res.get('memory', 0) / 2**30:.1f}",
            shown,
        )
    return table


def _serve_table() -> Table:
    from ray import serve

    table = Table(title="Serve applications")
    for column in ("application", "status", "deployment", "deployment status", "replicas"):
        table.add_column(column)
    try:
        details = serve.status()
    except Exception as exc:  # noqa: BLE001 - Serve not started is a normal state for status
        table.add_row("-", f"Serve not running ({type(exc).__name__})", "", "", "")
        return table
    for app_name, app in details.applications.items():
        for dep_name, dep in app.deployments.items():
            replicas = ", ".join(f"{state}:{count}" for state, count in dep.replica_states.items())
            table.add_row(app_name, _enum(app.status), dep_name, _enum(dep.status), replicas)
    return table


def _enum(value: object) -> str:
    return str(getattr(value, "value", value))


def _stages_table() -> Table:
    table = Table(title="Pipelines (one per replica) and their stages")
    for column in ("model", "replica", "stage", "layers", "params", "node", "pid", "RSS MiB"):
        table.add_column(column)
    names = [StageName.parse(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)]
    for stage in sorted((n for n in names if n), key=lambda n: (n.model, n.replica, n.index)):
        info = _describe(stage)
        table.add_row(
            stage.model,
            stage.replica[:12],
            str(stage.index),
            stage.layers,
            f"{info.param_count / 1e6:.1f}M" if info else "?",
            info.node_id[:12] if info else "?",
            str(info.pid) if info else "?",
            f"{info.rss_bytes / 2**20:.0f}" if info else "unreachable",
        )
    return table


def _describe(stage: StageName):  # type: ignore[no-untyped-def]
    try:
        return ray.get(ray.get_actor(stage.full, namespace=stage.namespace).describe.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - a dead stage is shown as unreachable
        return None
