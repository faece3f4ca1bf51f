"""The live `SnapshotSource`: reads a running SolanaLM cluster through Ray (the driver must be connected).

- nodes: Ray's node table, joined with the provider registry's records (wallet, region, reputation);
- pipelines: every `stage:*` actor (its layers and node, from `describe`), grouped by model and replica,
  plus each pipeline deployment's queue and steps through its Serve handle;
- counters: requests and tokens from Ray's Prometheus endpoints (`solanalm_*`), engine steps from the
  pipelines;
- earnings: each provider wallet's unpaid earnings from the payments actor.

Everything is read by name through Ray handles (duck-typed), so `cluster` imports neither serve_apps nor
payments. A part that cannot be read becomes a note in the snapshot, never an exception.
"""

import logging
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import ray

from cluster.config import Settings
from cluster.network.records import NodeRecord
from cluster.status import StageName
from cluster.tui.snapshot import (
    REQUESTS_METRICS,
    TOKENS_METRICS,
    Counters,
    NodeView,
    PipelineView,
    Snapshot,
    StageView,
    earnings_by_wallet,
    sum_metrics,
)

logger = logging.getLogger(__name__)
PIPELINE_PREFIX = "pipeline-"


@dataclass
class ClusterSource:
    """Reads snapshots of the cluster the driver is connected to; `timeout_s` bounds every remote call."""

    settings: Settings
    timeout_s: float = 5.0
    notes: list[str] = field(default_factory=list)

    def read(self) -> Snapshot:
        self.notes = []
        records = self._records()
        nodes = nodes_from(ray.nodes(), records, self.settings.network.label_prefix)
        stages = self._stages(nodes)
        infos = self._pipeline_infos()
        pipelines = group_pipelines(stages, infos)
        steps = sum(float(getattr(i, "steps", 0)) for i in infos.values()) if infos else None
        counters = Counters(time.monotonic(), *self._metrics(), steps=steps)
        earnings = earnings_by_wallet(nodes, self._unpaid({n.wallet for n in nodes if n.wallet}))
        return Snapshot(tuple(nodes), tuple(pipelines), tuple(earnings), counters, tuple(self.notes))

    def _records(self) -> list[NodeRecord]:
        from cluster.network.registry import call_registry, get_registry

        try:
            registry = get_registry(self.settings.network, self.settings.ray.namespace)
            records: list[NodeRecord] = call_registry(registry, "list_nodes", timeout_s=self.timeout_s)
            return records
        except ValueError:
            self.notes.append("no provider registry running")
        except Exception as exc:  # noqa: BLE001 - shown, not raised: the monitor must keep running
            self.notes.append(f"registry: {type(exc).__name__}")
        return []

    def _stages(self, nodes: list[NodeView]) -> list[StageView]:
        wallets = {n.node_id: n.wallet for n in nodes}
        names = [StageName.parse(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)]
        stages = [n for n in names if n is not None]
        refs: dict[str, Any] = {}
        for stage in stages:
            try:
                refs[stage.full] = ray.get_actor(stage.full, namespace=stage.namespace).describe.remote()
            except ValueError:
                continue  # gone since it was listed
        node_of = {}
        for name, ref in refs.items():
            try:
                node_of[name] = ray.get(ref, timeout=self.timeout_s).node_id
            except Exception:  # noqa: BLE001 - a dead stage shows without a node
                node_of[name] = None
        views = []
        for s in sorted(stages, key=lambda n: (n.model, n.replica, n.index)):
            node = node_of.get(s.full)
            views.append(StageView(s.model, s.replica, s.index, s.layers, node, wallets.get(node) if node else None))
        return views

    def _pipeline_infos(self) -> dict[str, Any]:
        """PipelineInfo (duck-typed) of one replica of each pipeline deployment of the served application."""
        from ray import serve

        app = self.settings.http.app_name
        try:
            deployments = serve.status().applications[app].deployments
        except Exception as exc:  # noqa: BLE001 - Serve not running or the app not deployed
            self.notes.append(f"application {app!r} not running ({type(exc).__name__})")
            return {}
        infos = {}
        for name in deployments:
            if not name.startswith(PIPELINE_PREFIX):
                continue
            try:
                handle = serve.get_deployment_handle(name, app_name=app)
                infos[name.removeprefix(PIPELINE_PREFIX)] = handle.describe.remote().result(timeout_s=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - a pipeline being replaced answers later
                self.notes.append(f"{name}: {type(exc).__name__}")
        return infos

    def _metrics(self) -> tuple[float | None, float | None]:
        texts = []
        for node in ray.nodes():
            port = node.get("MetricsExportPort")
            if not node.get("Alive") or not port:
                continue
            url = f"http://{node.get('NodeManagerAddress', '127.0.0.1')}:{port}/metrics"
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310 - cluster-local
                    texts.append(response.read().decode())
            except OSError:
                continue
        requests, tokens = sum_metrics(texts, REQUESTS_METRICS), sum_metrics(texts, TOKENS_METRICS)
        if requests is None:
            self.notes.append("no solanalm_* request metrics exported yet: rates from engine steps only")
        return requests, tokens

    def _unpaid(self, wallets: set[str]) -> dict[str, tuple[int, str] | None]:
        if not wallets:
            return {}
        try:
            actor = ray.get_actor(self.settings.payments.actor_name, namespace=self.settings.ray.namespace)
            balances: list[Any] = ray.get([actor.balance.remote(w) for w in sorted(wallets)], timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - payments disabled or unreachable
            self.notes.append(f"payments: {type(exc).__name__}")
            return {}
        return {b.wallet: (int(b.unpaid_earnings), str(b.asset)) for b in balances}


def nodes_from(ray_nodes: list[dict[str, Any]], records: list[NodeRecord], label_prefix: str) -> list[NodeView]:
    """Every Ray node (alive or dead) and every registry record, one row per node id."""
    by_id = {r.node_id: r for r in records}
    views = []
    for node in ray_nodes:
        node_id = node["NodeID"]
        labels = node.get("Labels") or {}
        resources = node.get("Resources") or {}
        record = by_id.pop(node_id, None)
        hardware = labels.get("ray.io/accelerator-type") or labels.get(f"{label_prefix}/hardware", "cpu")
        health = record.health if record else ("alive" if node.get("Alive") else "dead")
        views.append(
            NodeView(
                node_id,
                record.wallet if record else None,
                (record.region if record else labels.get(f"{label_prefix}/region", "")) or "",
                hardware,
                health,
                record.reputation if record else None,
                float(resources.get("CPU", 0)),
                float(resources.get("GPU", 0)),
                record.requests_served if record else 0,
                record.failures if record else 0,
            )
        )
    for record in by_id.values():  # registered but forgotten by Ray
        caps = record.capabilities
        views.append(
            NodeView(
                record.node_id,
                record.wallet,
                record.region,
                "cpu" if not caps.num_gpus else "gpu",
                record.health,
                record.reputation,
                caps.num_cpus,
                caps.num_gpus,
                record.requests_served,
                record.failures,
            )
        )
    return views


def group_pipelines(stages: list[StageView], infos: dict[str, Any]) -> list[PipelineView]:
    """One PipelineView per model (stages of all its replicas), with queue/running from its PipelineInfo."""
    models = sorted({s.model for s in stages} | set(infos))
    views = []
    for model in models:
        info = infos.get(model)
        views.append(
            PipelineView(
                model,
                tuple(s for s in stages if s.model == model),
                getattr(info, "queue_depth", None),
                getattr(info, "running", None),
            )
        )
    return views
