"""The node registry: who joined with which wallet, their health from Ray, counters and reputation.

`NetworkRegistry` is pure state and logic (unit-tested without Ray; callers pass the clock and Ray's
node table). `RegistryActor` wraps it as the named, detached Ray actor "solanalm-registry" and
persists every record in Ray's GCS internal KV, so a restarted actor (or a restarted head with GCS
fault tolerance) reloads the network's memory.
"""

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError

from cluster.config.network import NetworkSection
from cluster.network import reputation
from cluster.network.records import Health, NodeCapabilities, NodeRecord
from cluster.network.wallet import Challenge, ChallengeBook, JoinProof, ProofError

logger = logging.getLogger(__name__)

RAY_LABEL_PREFIX = "ray.io/"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's resource that only the head node has


@dataclass(slots=True)
class NetworkRegistry:
    """Records keyed by Ray node id, the pending join challenges, and which records changed."""

    settings: NetworkSection
    records: dict[str, NodeRecord] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    challenges: ChallengeBook = field(init=False)

    def __post_init__(self) -> None:
        self.challenges = ChallengeBook(ttl_s=self.settings.challenge_ttl_s)

    def label(self, name: str) -> str:
        """The full label key of one of SolanaLM's node labels: label('wallet') -> 'solanalm.io/wallet'."""
        return f"{self.settings.label_prefix}/{name}"

    def issue_challenge(self, node_id: str, wallet: str, now: float) -> Challenge:
        return self.challenges.issue(node_id, wallet, now)

    def register(
        self,
        proof: JoinProof,
        capabilities: NodeCapabilities,
        ray_node: dict[str, Any] | None,
        now: float,
        labels: dict[str, str] | None = None,
    ) -> NodeRecord:
        """Verify the proof against the challenge and the live Ray node, then add (or refresh) the record.

        The Ray node must be alive and carry the proving wallet in its wallet label, so the wallet that
        signed is the one the node advertises; declared `labels` must agree with the node's.
        """
        wallet = str(self.challenges.verify(proof, now))
        node_id = proof.challenge.node_id
        if ray_node is None or not ray_node.get("Alive", False):
            raise ProofError(f"node {node_id} is not a live Ray node")
        node_labels = _provider_labels(ray_node)
        if node_labels.get(self.label("wallet")) != wallet:
            raise ProofError(f"node {node_id} is not labelled {self.label('wallet')}={wallet}")
        for key, value in (labels or {}).items():
            if node_labels.get(key) != value:
                raise ProofError(f"declared label {key}={value} differs from the node's {node_labels.get(key)!r}")
        others = [r for r in self.records.values() if r.node_id != node_id]
        record = NodeRecord(
            node_id=node_id,
            wallet=wallet,
            region=node_labels.get(self.label("region"), ""),
            labels=node_labels,
            capabilities=_with_ray_resources(capabilities, ray_node),
            verified=True,
            health="alive",
            joined_at=now,
            reputation=reputation.joining_reputation(wallet, others, self.settings.reputation),
        )
        self._put(record)
        logger.info("node %s joined for wallet %s (reputation %.2f)", node_id[:12], wallet, record.reputation)
        return record

    def set_draining(self, node_id: str, draining: bool = True) -> NodeRecord:
        record = self._get(node_id)
        health: Health = record.health if record.health == "dead" else ("draining" if draining else "alive")
        updated = replace(record, draining=draining, health=health)
        self._put(updated)
        return updated

    def sync_health(self, ray_nodes: Sequence[dict[str, Any]]) -> list[str]:
        """Health from Ray's node table (ray.nodes()): dead when Ray says so or forgot the node.
        Returns the ids whose health changed."""
        alive = {n["NodeID"] for n in ray_nodes if n.get("Alive", False)}
        changed = []
        for record in list(self.records.values()):
            health: Health = "dead" if record.node_id not in alive else ("draining" if record.draining else "alive")
            if health != record.health:
                self._put(replace(record, health=health))
                changed.append(record.node_id)
        return changed

    def record_request(self, node_ids: Sequence[str], ok: bool, latency_s: float | Sequence[float]) -> list[str]:
        """One request served (ok) or failed by a pipeline over `node_ids`; `latency_s` is the request's
        latency, or one per node. Returns the ids not registered (ignored)."""
        latencies = _per_node(node_ids, latency_s)
        unknown = []
        for node_id, latency in zip(node_ids, latencies, strict=True):
            record = self.records.get(node_id)
            if record is None:
                unknown.append(node_id)
                continue
            self._put(reputation.after_request(record, ok, latency, self.settings.reputation))
        return unknown

    def record_verification(self, node_ids: Sequence[str], passed: bool) -> list[str]:
        """A spot-check over a request these nodes served passed or failed. Returns the unknown ids."""
        unknown = []
        for node_id in node_ids:
            record = self.records.get(node_id)
            if record is None:
                unknown.append(node_id)
                continue
            self._put(reputation.after_verification(record, passed, self.settings.reputation))
        return unknown

    def list_nodes(self) -> list[NodeRecord]:
        return sorted(self.records.values(), key=lambda r: (r.joined_at, r.node_id))

    def eligible_nodes(self) -> list[NodeRecord]:
        """Nodes that may get new stages: verified, alive, not draining, reputable enough."""
        floor = self.settings.reputation.min_eligible
        return [r for r in self.list_nodes() if r.verified and r.health == "alive" and r.reputation >= floor]

    def scores(self, queued: dict[str, int] | None = None) -> dict[str, float]:
        """Routing score of every eligible node (see reputation.node_score)."""
        queued = queued or {}
        weights = self.settings.routing
        return {r.node_id: reputation.node_score(r, weights, queued.get(r.node_id, 0)) for r in self.eligible_nodes()}

    def take_dirty(self) -> list[NodeRecord]:
        """The records changed since the last call (to persist)."""
        changed = [self.records[i] for i in sorted(self.dirty) if i in self.records]
        self.dirty.clear()
        return changed

    def _get(self, node_id: str) -> NodeRecord:
        try:
            return self.records[node_id]
        except KeyError as exc:
            raise KeyError(f"node {node_id} is not registered") from exc

    def _put(self, record: NodeRecord) -> None:
        self.records[record.node_id] = record
        self.dirty.add(record.node_id)


def _per_node(node_ids: Sequence[str], latency_s: float | Sequence[float]) -> list[float]:
    if isinstance(latency_s, int | float):
        return [float(latency_s)] * len(node_ids)
    if len(latency_s) != len(node_ids):
        raise ValueError("latency_s needs one value per node id")
    return [float(x) for x in latency_s]


def _provider_labels(ray_node: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in (ray_node.get("Labels") or {}).items() if not k.startswith(RAY_LABEL_PREFIX)}


def _with_ray_resources(claimed: NodeCapabilities, ray_node: dict[str, Any]) -> NodeCapabilities:
    # Ray's accounting is what schedules stages, so its CPU/GPU/memory beat the provider's claim.
    resources = ray_node.get("Resources") or {}
    labels = ray_node.get("Labels") or {}
    return replace(
        claimed,
        num_cpus=float(resources.get("CPU", claimed.num_cpus)),
        num_gpus=float(resources.get("GPU", claimed.num_gpus)),
        memory_bytes=int(resources.get("memory", claimed.memory_bytes)),
        accelerator=labels.get("ray.io/accelerator-type", claimed.accelerator),
    )


class KvStore:
    """NodeRecords as JSON under `<prefix>/node/<node id>` in Ray's GCS internal KV."""

    def __init__(self, namespace: str, prefix: str) -> None:
        self.namespace = namespace
        self.prefix = f"{prefix}/node/"

    def load(self) -> dict[str, NodeRecord]:
        from ray.experimental import internal_kv as kv

        records = {}
        for key in kv._internal_kv_list(self.prefix, namespace=self.namespace):
            raw = kv._internal_kv_get(key, namespace=self.namespace)
            try:
                record = NodeRecord.from_json(json.loads(raw))
            except (TypeError, ValueError) as exc:  # one bad entry must not crash-loop the registry
                logger.error("skipping unreadable registry entry %r: %s", key, exc)
                continue
            records[record.node_id] = record
        return records

    def save(self, records: Sequence[NodeRecord]) -> None:
        from ray.experimental import internal_kv as kv

        for record in records:
            kv._internal_kv_put(
                self.prefix + record.node_id, json.dumps(record.to_json()), True, namespace=self.namespace
            )


class RegistryActor:
    """The registry as a Ray actor; create it with `get_or_create_registry`. Membership changes are
    persisted at once, counter updates at most every `persist_interval_s` (and on `flush`)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = NetworkSection.model_validate(settings)
        self._store = KvStore(self._settings.kv_namespace, self._settings.registry_name)
        self._registry = NetworkRegistry(self._settings, records=self._store.load())
        self._last_persist = time.monotonic()
        logger.info("registry loaded %d node records", len(self._registry.records))

    def ping(self) -> int:
        return len(self._registry.records)

    def node_id(self) -> str:
        """The Ray node this actor runs on (the head)."""
        return ray.get_runtime_context().get_node_id()

    def issue_challenge(self, node_id: str, wallet: str) -> Challenge:
        return self._registry.issue_challenge(node_id, wallet, time.time())

    def register(
        self, proof: JoinProof, capabilities: NodeCapabilities, labels: dict[str, str] | None = None
    ) -> NodeRecord:
        ray_node = next((n for n in ray.nodes() if n["NodeID"] == proof.challenge.node_id), None)
        record = self._registry.register(proof, capabilities, ray_node, time.time(), labels)
        self._persist(force=True)
        return record

    def set_draining(self, node_id: str, draining: bool = True) -> NodeRecord:
        record = self._registry.set_draining(node_id, draining)
        self._persist(force=True)
        return record

    def sync_health(self) -> list[str]:
        changed = self._registry.sync_health(ray.nodes())
        self._persist(force=bool(changed))
        return changed

    def record_request(self, node_ids: list[str], ok: bool, latency_s: float | list[float]) -> list[str]:
        unknown = self._registry.record_request(node_ids, ok, latency_s)
        self._persist()
        return unknown

    def record_verification(self, node_ids: list[str], passed: bool) -> list[str]:
        unknown = self._registry.record_verification(node_ids, passed)
        self._persist(force=True)
        return unknown

    def list_nodes(self, sync: bool = True) -> list[NodeRecord]:
        if sync:
            self.sync_health()
        return self._registry.list_nodes()

    def eligible_nodes(self, sync: bool = True) -> list[NodeRecord]:
        if sync:
            self.sync_health()
        return self._registry.eligible_nodes()

    def scores(self, queued: dict[str, int] | None = None) -> dict[str, float]:
        return self._registry.scores(queued)

    def flush(self) -> None:
        self._persist(force=True)

    def _persist(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_persist < self._settings.persist_interval_s:
            return
        self._store.save(self._registry.take_dirty())
        self._last_persist = now


def get_or_create_registry(settings: NetworkSection, namespace: str) -> "ray.actor.ActorHandle":
    """The registry actor of this cluster, created (detached, restarted on failure) if missing. It is
    pinned to the head node: on a provider node it would die (and forget recent counters) when that
    provider leaves."""
    actor_cls: Any = ray.remote(RegistryActor)
    handle: ray.actor.ActorHandle = actor_cls.options(
        name=settings.registry_name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        resources={HEAD_NODE_RESOURCE: 0.001},
    ).remote(settings.model_dump(mode="json"))
    return handle


def get_registry(settings: NetworkSection, namespace: str) -> "ray.actor.ActorHandle":
    """The running registry actor (ValueError when there is none)."""
    return ray.get_actor(settings.registry_name, namespace=namespace)


def call_registry(
    registry: "ray.actor.ActorHandle",
    method: str,
    *args: Any,
    timeout_s: float,
    attempts: int = 5,
    backoff_s: float = 0.5,
) -> Any:
    """Call a registry method, retrying while the actor restarts (ActorUnavailableError) with linear
    backoff. Safe for reads and for record_* (a retried record counts at most twice); not for register,
    whose nonce is spent by the first attempt."""
    for attempt in range(1, attempts):
        try:
            return ray.get(getattr(registry, method).remote(*args), timeout=timeout_s)
        except ActorUnavailableError:
            logger.info("registry unavailable (restarting?); retry %d/%d", attempt, attempts - 1)
            time.sleep(backoff_s * attempt)
    return ray.get(getattr(registry, method).remote(*args), timeout=timeout_s)
