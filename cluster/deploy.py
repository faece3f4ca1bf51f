"""Deploying the serve application from a Serve config file, by import path (as `serve run` does).

`cluster` sits below `serve_apps`, so it never imports the builder statically: the config file names
it (`import_path: serve_apps.builder:build_app`) and it is resolved at run time.

With a provider registry running, `plan_deployment` plans each served model's stages over the eligible
provider nodes and `with_plans` writes the plans into `pipeline.placements` (layer counts + pinned nodes);
`start_controller` then keeps them on live nodes (re-plan and redeploy when a planned node leaves).
"""

import functools
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import serve

from cluster.config import Settings, load_settings
from cluster.models import load_catalogue, materialize
from cluster.network.model_cost import model_cost_for
from cluster.network.placement import ModelCost, StagePlan
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.replacement import PlacementController
from cluster.network.serving_plan import is_provider_host, placements_args, plan_models
from cluster.serve_wait import Report, run_application, start_serve

logger = logging.getLogger(__name__)


def _quiet(_awaited: str) -> None:
    """deploy's default report: serve_wait logs what it waits for anyway."""


@dataclass(frozen=True, slots=True)
class ServeApp:
    """One application entry of a Serve config file, with its `args` as SolanaLM settings sections."""

    name: str
    route_prefix: str
    import_path: str
    args: dict[str, Any]
    http_options: dict[str, Any]
    proxy_location: str = "EveryNode"  # Serve's proxies: EveryNode, HeadOnly or Disabled


def read_serve_config(path: Path) -> ServeApp:
    """The first application of a Serve config YAML (`applications: [{name, import_path, args}]`)."""
    raw = yaml.safe_load(path.read_text()) or {}
    apps = raw.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    app = apps[0]
    return ServeApp(
        name=app.get("name", "solanalm"),
        route_prefix=app.get("route_prefix", "/"),
        import_path=app["import_path"],
        args=dict(app.get("args") or {}),
        http_options=dict(raw.get("http_options") or {}),
        proxy_location=str(raw.get("proxy_location") or "EveryNode"),
    )


def settings_for(app: ServeApp, overrides: dict[str, dict[str, Any]]) -> Settings:
    """Settings from the config file's args, CLI overrides on top (environment still wins)."""
    merged: dict[str, dict[str, Any]] = {key: dict(value or {}) for key, value in app.args.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return load_settings(**merged)


def deploy(app: ServeApp, settings: Settings, report: Report = _quiet) -> float:
    """Start Serve's HTTP proxy and run the application; returns the seconds it took to become ready.

    Both waits share `http.startup_timeout_s`; `report` hears what is awaited each time that changes;
    StartupTimeout (naming what was still missing) or DeployFailed when it cannot become ready.
    """
    started = time.perf_counter()
    timeout_s = settings.http.startup_timeout_s
    start_registry(settings)
    deadline = start_serve(app.proxy_location, http_options(settings), timeout_s, report)
    builder = _resolve(app.import_path)
    args = settings.model_dump(mode="json", include={"model", "pipeline", "http", "network", "logging"})
    if settings.http.operator_token is not None:  # masked by the JSON dump; the builder needs the value
        args["http"]["operator_token"] = settings.http.operator_token.get_secret_value()
    # Secrets are masked in a JSON dump; payments settings travel as values, unmasked.
    args["payments"] = settings.payments.model_dump(mode="python")
    args["payments"] = {
        k: (v.get_secret_value() if hasattr(v, "get_secret_value") else v) for k, v in args["payments"].items()
    }
    name = settings.http.app_name or app.name
    run_application(builder(args), name, app.route_prefix, deadline, timeout_s, report)
    return time.perf_counter() - started


def start_registry(settings: Settings) -> None:
    """The network registry (named, detached, on the head): providers register through the gateway into it."""
    from cluster.network.registry import get_or_create_registry

    get_or_create_registry(settings.network, settings.ray.namespace)


def http_options(settings: Settings) -> dict[str, Any]:
    """Serve's proxy options: host, port and, with a certificate, HTTPS (`http.ssl_certfile`/`ssl_keyfile`)."""
    options: dict[str, Any] = {"host": settings.http.host, "port": settings.http.port}
    if settings.http.ssl_certfile is not None and settings.http.ssl_keyfile is not None:
        options["ssl_certfile"] = str(settings.http.ssl_certfile.expanduser())
        options["ssl_keyfile"] = str(settings.http.ssl_keyfile.expanduser())
    return options


def drain_and_shutdown(app_name: str) -> None:
    """Remove the application gracefully, then stop Serve.

    Deleting the application first lets every replica finish its in-flight requests (each deployment's
    graceful_shutdown_timeout_s) while the HTTP proxies still carry their responses; `serve.shutdown()`
    alone stops the proxies at once and cuts running streams.
    """
    try:
        serve.delete(app_name)
    except Exception:  # noqa: BLE001 - no such application (already removed): nothing to drain
        logger.info("no serve application %r to drain", app_name)
    serve.shutdown()


def model_costs(settings: Settings) -> dict[str, ModelCost]:
    """Per served model: layer, embedding, head and KV bytes (KV for `max_num_seqs` full contexts), the
    packed low-bit copies of `weight_quant` included."""
    catalogue = load_catalogue(settings.model.catalogue)
    costs = {}
    for name in settings.model.served:
        spec = catalogue.get(name)
        dtype = settings.model.dtype or spec.dtype
        model_dir = materialize(spec, settings.model.cache_dir, dtype)
        max_len = settings.pipeline.max_model_len or spec.max_model_len or 0
        quant = settings.model.weight_quant or spec.weight_quant
        kv_tokens = settings.pipeline.max_num_seqs * max_len
        costs[name] = model_cost_for(model_dir, dtype, kv_tokens=kv_tokens, weight_quant=quant)
    return costs


def registry_records(settings: Settings, eligible: bool = True) -> list[NodeRecord] | None:
    """The registry's (eligible) provider records, or None when no registry runs on the cluster. The operator's
    own node (registered by `solanalm up`, see local_node.py) is left out: placement plans it as before."""
    from cluster.network.local_node import is_operator_record
    from cluster.network.registry import call_registry, get_registry

    try:
        registry = get_registry(settings.network, settings.ray.namespace)
    except ValueError:
        return None
    method = "eligible_nodes" if eligible else "list_nodes"
    records: list[NodeRecord] = call_registry(registry, method, timeout_s=settings.network.registry_call_timeout_s)
    return [r for r in records if not is_operator_record(r, settings.network.label_prefix)]


def replan_requests(settings: Settings) -> list[str]:
    """The models the operator asked to re-plan (the dashboard's action), taken from the registry; [] without one."""
    from cluster.network.registry import call_registry, get_registry

    try:
        registry = get_registry(settings.network, settings.ray.namespace)
    except ValueError:
        return []
    requested: list[str] = call_registry(
        registry, "take_replan_requests", timeout_s=settings.network.registry_call_timeout_s
    )
    return requested


def planning_records(settings: Settings, eligible: bool = True) -> list[NodeRecord]:
    """What placement plans over: the registry's records, and, once a provider's stage host (outside the
    cluster) is among them, the operator's own Ray nodes that are not registered (the head, its workers),
    so a pipeline keeps operator stages beside the providers' ([] without a registry)."""
    records = registry_records(settings, eligible=eligible) or []
    if not any(is_provider_host(r.node_id) for r in records):
        return records
    return records + operator_records(settings, {r.node_id for r in records})


def operator_records(settings: Settings, registered: set[str]) -> list[NodeRecord]:
    """The live Ray nodes not in the registry, as records of the operator's own (wallet '': the operator's)."""
    import ray

    # A declared figure, else this driver's machine measured (the head's speed on one machine).
    gflops = settings.network.placement.operator_throughput_gflops or _local_gflops()
    records = []
    for node in ray.nodes():
        if not node.get("Alive") or node["NodeID"] in registered:
            continue
        resources = node.get("Resources") or {}
        capabilities = NodeCapabilities(
            num_cpus=float(resources.get("CPU", 0.0)),
            num_gpus=float(resources.get("GPU", 0.0)),
            memory_bytes=int(resources.get("memory", 0)),
            throughput_gflops=gflops,
        )
        records.append(NodeRecord(node_id=node["NodeID"], wallet="", capabilities=capabilities, reputation=1.0))
    return records


def register_local_node(settings: Settings, state_dir: Path) -> NodeRecord | None:
    """Start the registry and register this machine's head as the operator's own node with the local wallet
    (state_dir/local-wallet.json), so the network shows it; None (logged) when the registry refuses."""
    from cluster.network import local_node

    gflops = settings.network.placement.operator_throughput_gflops or _local_gflops()
    try:
        return local_node.register_local_node(settings, state_dir, gflops)
    except Exception as exc:  # noqa: BLE001 - the network view must not stop serving from starting
        logger.warning("could not register the operator's node in the registry: %s", exc)
        return None


@functools.cache
def _local_gflops() -> float:
    """Measured once per process: re-measuring would make equal plans differ by noise."""
    from cluster.network.join import measure_throughput_gflops

    return measure_throughput_gflops()


def plan_deployment(settings: Settings, costs: dict[str, ModelCost] | None = None) -> dict[str, StagePlan]:
    """Stage plans over the registry's eligible providers (and the operator's nodes beside providers' stage
    hosts); {} (today's equal split) without registry or providers, or when `use_registry` is off."""
    if not settings.network.placement.use_registry:
        return {}
    records = planning_records(settings)
    if not records:
        return {}
    return plan_models(costs if costs is not None else model_costs(settings), records, settings.network.placement)


def with_plans(settings: Settings, plans: dict[str, StagePlan]) -> Settings:
    """A copy of `settings` whose `pipeline.placements` are exactly `plans` (empty: unpinned equal split)."""
    planned = settings.model_copy(deep=True)
    planned.pipeline = planned.pipeline.model_copy(update={"placements": {}})
    planned.pipeline.placements = placements_args(plans)  # type: ignore[assignment]  # validated on assignment
    return planned


def start_controller(
    app: ServeApp, settings: Settings, plans: dict[str, StagePlan], costs: dict[str, ModelCost] | None = None
) -> PlacementController:
    """Watch the registry in a daemon thread; when a planned node leaves, or the eligible nodes change (a
    provider's stage host registered), re-plan and redeploy `app`."""

    def redeploy(new_plans: dict[str, StagePlan]) -> None:
        deploy(app, with_plans(settings, new_plans))

    def records() -> list[NodeRecord]:
        return planning_records(settings, eligible=False)

    controller = PlacementController(
        costs if costs is not None else model_costs(settings),
        plans,
        settings.network.placement,
        records,
        redeploy,
        min_reputation=settings.network.reputation.min_eligible,
        requests=lambda: replan_requests(settings),
    )
    controller.start()
    return controller


def _resolve(import_path: str):  # type: ignore[no-untyped-def]
    module_name, _, attr = import_path.partition(":")
    if not attr:
        module_name, _, attr = import_path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)
