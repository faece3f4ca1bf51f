"""`solanalm status`: nodes, Serve deployments, and where every pipeline stage runs and what it holds.

The stages come from each pipeline deployment's `describe` (PipelineInfo: the stage actors in the operator's
placement groups and the providers' stage hosts alike), else from the named `stage:*` actors. Each row shows
the layers, the bytes of dense and low-bit weights, and the stage's `weights` description (GGUF quant types,
low-bit kinds, tensors left dense); the rendering is pure over duck-typed StageInfo (tests/unit/cluster).
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def render_status(console: Console, network: NetworkSection, namespace: str, app_name: str = "solanalm") -> None:
    console.print(_nodes_table())
    console.print(_providers(network, namespace))
    console.print(_serve_table())
    console.print(_stages_table(app_name))


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


STAGE_COLUMNS = (
    "model",
    "replica",
    "stage",
    "layers",
    "where",
    "pid",
    "dense MiB",
    "low-bit MiB",
    "weights",
    "RSS MiB",
)


def stages_table(pipelines: Iterable[tuple[str, str, Sequence[Any]]]) -> Table:
    """One row per stage of each (model, replica id, StageInfos) pipeline: what it holds and where."""
    table = Table(title="Pipelines (one per replica) and what each stage holds")
    for column in STAGE_COLUMNS:
        table.add_column(column)
    for model, replica, stages in pipelines:
        for info in stages:
            table.add_row(*stage_row(model, replica, info))
    return table


def stage_row(model: str, replica: str, info: Any) -> tuple[str, ...]:
    """The cells of one stage (a StageInfo, or None when it did not answer)."""
    if info is None:
        return (model, replica[:12], "?", "?", "?", "?", "?", "?", "?", "unreachable")
    ends = "".join(tag for tag, held in ((" +embed", info.has_embedding), (" +head", info.has_lm_head)) if held)
    extra = dict(getattr(info, "extra", {}) or {})
    low_bit = int(extra.get("low_bit_bytes") or 0)
    return (
        model,
        replica[:12],
        str(info.stage_index),
        f"{info.layer_start}-{info.layer_end}{ends}",
        _where(info, extra),
        str(info.pid),
        f"{info.param_bytes / 2**20:.1f}",
        f"{low_bit / 2**20:.1f}" if low_bit else "-",
        weights_summary(stage_weights(info)),
        f"{info.rss_bytes / 2**20:.0f}",
    )


def stage_weights(info: Any) -> Mapping[str, Any]:
    """The stage's `weights` description: an attribute, or `extra["weights"]` as JSON (the wire's string map)."""
    found = getattr(info, "weights", None)
    if found is None:
        found = (getattr(info, "extra", {}) or {}).get("weights")
    if isinstance(found, str):
        try:
            found = json.loads(found)
        except ValueError:
            return {}
    return found if isinstance(found, Mapping) else {}


def weights_summary(weights: Mapping[str, Any]) -> str:
    """`GGUF Q4_K:120 Q6_K:1; low-bit int4:120; dense fallback: a, b +3` from the `weights` key ('-': none)."""
    parts = []
    if weights.get("gguf_types"):
        parts.append("GGUF " + _pairs(weights["gguf_types"]))
    if weights.get("low_bit"):
        parts.append("low-bit " + _pairs(weights["low_bit"]))
    fallback = weights.get("dense_fallback")
    if fallback:
        items = [str(item) for item in (fallback.items() if isinstance(fallback, Mapping) else fallback)]
        shown = ", ".join(items[:3]) + (f" +{len(items) - 3}" if len(items) > 3 else "")
        parts.append(f"dense fallback: {shown}")
    return "; ".join(parts) or "-"


def _pairs(value: Any) -> str:
    if isinstance(value, Mapping):
        return " ".join(f"{key}:{value[key]}" for key in sorted(value))
    if isinstance(value, list | tuple):
        return " ".join(str(item) for item in value)
    return str(value)


def _where(info: Any, extra: Mapping[str, str]) -> str:
    """The provider's stage host (its digest says so) or the Ray node of an operator stage."""
    node = str(info.node_id or "")
    if extra.get("weights_digest") or node.startswith("provider-"):
        return f"provider {node[:21]}"
    return node[:12] or "?"


def _stages_table(app_name: str) -> Table:
    pipelines = _pipeline_stages(app_name)
    if pipelines:
        return stages_table(pipelines)
    # No pipeline answered (Serve down, or being replaced): what the named stage actors say.
    names = [StageName.parse(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)]
    ordered = sorted((n for n in names if n), key=lambda n: (n.model, n.replica, n.index))
    return stages_table((stage.model, stage.replica, [_describe(stage)]) for stage in ordered)


def _pipeline_stages(app_name: str) -> list[tuple[str, str, Sequence[Any]]]:
    """(model, replica, stages) of one replica of each pipeline deployment of `app_name` ([] if none answers)."""
    from ray import serve

    try:
        deployments = serve.status().applications[app_name].deployments
    except Exception:  # noqa: BLE001 - Serve not running or the app not deployed
        return []
    found: list[tuple[str, str, Sequence[Any]]] = []
    for name in sorted(deployments):
        if not name.startswith("pipeline-"):
            continue
        try:
            handle = serve.get_deployment_handle(name, app_name=app_name)
            info = handle.describe.remote().result(timeout_s=10)
        except Exception:  # noqa: BLE001 - a pipeline being replaced answers later
            continue
        found.append((info.model, info.replica_id, tuple(info.stages)))
    return found


def _describe(stage: StageName):  # type: ignore[no-untyped-def]
    try:
        return ray.get(ray.get_actor(stage.full, namespace=stage.namespace).describe.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - a dead stage is shown as unreachable
        return None
