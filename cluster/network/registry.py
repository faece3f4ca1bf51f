"""The node registry: who joined with which wallet, their health, counters and reputation.

Two kinds of member: Ray nodes (`solanalm node join`; health from Ray's node table) and providers outside
the Ray cluster that registered over the gateway's HTTP API (`solanalm provider serve`; health from their
heartbeats; see providers.py for what their registration proves).

`NetworkRegistry` is pure state and logic (unit-tested without Ray; callers pass the clock and Ray's
node table). `RegistryActor` wraps it as the named, detached Ray actor "solanalm-registry" and
persists every record (and, apart from them, the providers' token secrets) in Ray's GCS internal KV, so
a restarted actor (or a restarted head with GCS fault tolerance) reloads the network's memory.
"""

import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError

from cluster.config.network import NetworkSection
from cluster.network import providers as P
from cluster.network import reputation
from cluster.network.records import Health, NodeCapabilities, NodeRecord
from cluster.network.wallet import Challenge, ChallengeBook, JoinProof, ProofError, ProviderChallenge

logger = logging.getLogger(__name__)

RAY_LABEL_PREFIX = "ray.io/"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's resource that only the head node has
OPERATOR_LABEL = "operator"  # <label_prefix>/operator=true: the operator's own node (see register_operator)


@dataclass(slots=True)
class NetworkRegistry:
    """Records keyed by Ray node id or provider id, the pending challenges, the providers' secrets (apart
    from the records) and which records and secrets changed."""

    settings: NetworkSection
    records: dict[str, NodeRecord] = field(default_factory=dict)
    provider_secrets: dict[str, P.ProviderSecrets] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    dirty_secrets: set[str] = field(default_factory=set)
    challenges: ChallengeBook = field(init=False)
    provider_challenges: ChallengeBook = field(init=False)
    sessions: dict[str, str] = field(init=False)  # session token SHA-256 -> provider id
    replan_requests: set[str] = field(default_factory=set)  # models the operator asked to re-plan (not persisted)

    def __post_init__(self) -> None:
        self.challenges = ChallengeBook(ttl_s=self.settings.challenge_ttl_s)
        rule = self.settings.providers
        self.provider_challenges = ChallengeBook(ttl_s=rule.challenge_ttl_s, max_pending=rule.max_pending_challenges)
        self.sessions = {s.session_sha256: s.provider_id for s in self.provider_secrets.values()}

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

    def register_operator(
        self, proof: JoinProof, capabilities: NodeCapabilities, ray_node: dict[str, Any] | None, now: float
    ) -> NodeRecord:
        """The operator's own node (the head, where this registry runs), proved by the operator's local wallet.

        No wallet label is needed (`solanalm up` started the head before any wallet existed): the node must be
        the live head. Labelled `<prefix>/operator=true`, so placement keeps treating it as the operator's (its
        stages stay in the operator's placement groups); a re-registration keeps its counters and join time.
        """
        wallet = str(self.challenges.verify(proof, now))
        node_id = proof.challenge.node_id
        if ray_node is None or not ray_node.get("Alive", False):
            raise ProofError(f"node {node_id} is not a live Ray node")
        if HEAD_NODE_RESOURCE not in (ray_node.get("Resources") or {}):
            raise ProofError(f"node {node_id} is not the head node: only the head is the operator's own node")
        labels = {**_provider_labels(ray_node), self.label("wallet"): wallet, self.label(OPERATOR_LABEL): "true"}
        labels.setdefault(self.label("hardware"), "gpu" if capabilities.num_gpus > 0 else "cpu")
        previous = self.records.get(node_id)
        base = previous if previous is not None and previous.wallet == wallet else NodeRecord(node_id, wallet)
        record = replace(
            base,
            labels=labels,
            region=labels.get(self.label("region"), ""),
            capabilities=_with_ray_resources(capabilities, ray_node),
            verified=True,
            health="alive",
            draining=False,
            joined_at=base.joined_at or now,
            reputation=base.reputation if previous is base else 1.0,  # the operator trusts its own machine
        )
        self._put(record)
        logger.info("the operator's node %s registered for wallet %s", node_id[:12], wallet)
        return record

    def issue_provider_challenge(
        self, wallet: str, endpoint: str, cert_fingerprint: str, now: float
    ) -> ProviderChallenge:
        """A registration challenge for `wallet`'s stage host at `endpoint` with that certificate."""
        P.validate_endpoint(endpoint, self.settings.providers.allow_private_endpoints)
        P.validate_fingerprint(cert_fingerprint)
        return self.provider_challenges.issue_provider(wallet, endpoint, cert_fingerprint, now)

    def register_provider(
        self,
        proof_json: Mapping[str, Any],
        cert_pem: str,
        capabilities_json: Mapping[str, Any] | None,
        models: Sequence[str],
        now: float,
        region: str = "",
        allowed_models: Collection[str] | None = None,
    ) -> P.ProviderRegistration:
        """Verify a provider's proof and certificate, then add (or replace) its record with fresh tokens.

        The request's shape is checked before the proof, so a malformed request leaves its nonce pending;
        every request that reaches the proof consumes the nonce. Re-registering the same wallet and endpoint
        replaces the record's certificate, capabilities, models and both tokens (the old ones stop working).
        """
        rule = self.settings.providers
        proof = P.proof_from_json(proof_json)
        capabilities = P.parse_capabilities(capabilities_json)
        names = P.validate_models(models, rule.max_models, allowed_models)
        P.validate_region(region)
        wallet = str(self.provider_challenges.verify(proof, now))
        P.check_proved_certificate(proof, cert_pem, now)
        pid = P.provider_id(wallet, proof.challenge.endpoint)
        P.check_limits(pid, wallet, proof.challenge.endpoint, self.records.values(), rule)
        previous = self.records.get(pid)
        others = [r for r in self.records.values() if r.node_id != pid]
        record = P.provider_record(
            pid, proof, cert_pem, capabilities, names, region, now, previous, others, self.settings.reputation
        )
        session_token, secret = P.new_secrets(pid)
        self._put(record)
        self._put_secrets(secret)
        logger.info("provider %s registered at %s for wallet %s", pid, record.endpoint, wallet)
        return P.ProviderRegistration(record, session_token, secret.link_token, rule.heartbeat_interval_s)

    def provider_heartbeat(self, session_token: str, now: float) -> NodeRecord:
        """The provider of this session is alive (or still draining) as of `now`; UnknownSession otherwise."""
        record = self.session_record(session_token)
        health: Health = "draining" if record.draining else "alive"
        updated = replace(record, last_seen=now, health=health)
        self._put(updated)
        return updated

    def provider_leave(self, session_token: str) -> NodeRecord:
        """The provider of this session leaves: draining (no new stages), then dead once heartbeats stop."""
        return self.set_draining(self.session_record(session_token).node_id, True)

    def provider_links(self, provider_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """How the operator's coordinator reaches each known provider's stage host (operator-only: carries
        the link token). Unknown ids and Ray nodes are left out."""
        links = {}
        for pid in provider_ids:
            record, secret = self.records.get(pid), self.provider_secrets.get(pid)
            if record is None or secret is None or record.kind != "provider":
                continue
            links[pid] = {
                "endpoint": record.endpoint,
                "cert_pem": record.cert_pem,
                "link_token": secret.link_token,
                "wallet": record.wallet,
            }
        return links

    def session_record(self, session_token: str) -> NodeRecord:
        """The record of the provider holding this session token (UnknownSession otherwise)."""
        if not isinstance(session_token, str) or not session_token:
            raise P.UnknownSession("no session token")
        pid = self.sessions.get(P.token_sha256(session_token))
        record = self.records.get(pid) if pid is not None else None
        if record is None:
            raise P.UnknownSession("unknown or replaced session token (register again)")
        return record

    def set_draining(self, node_id: str, draining: bool = True) -> NodeRecord:
        record = self._get(node_id)
        health: Health = record.health if record.health == "dead" else ("draining" if draining else "alive")
        updated = replace(record, draining=draining, health=health)
        self._put(updated)
        return updated

    def request_replan(self, models: Sequence[str]) -> list[str]:
        """Ask the placement controller to re-plan `models` on its next round; every model asked so far."""
        self.replan_requests.update(models)
        return sorted(self.replan_requests)

    def take_replan_requests(self) -> list[str]:
        """The models asked to be re-planned since the last call (the controller takes them once)."""
        taken, self.replan_requests = sorted(self.replan_requests), set()
        return taken

    def sync_health(self, ray_nodes: Sequence[dict[str, Any]], now: float | None = None) -> list[str]:
        """Ray nodes' health from Ray's node table (ray.nodes()): dead when Ray says so or forgot the node.
        Providers' health from their heartbeats, when `now` is given: dead once the last is older than
        `providers.heartbeat_ttl_s` (Ray knows nothing of them). Returns the ids whose health changed."""
        alive = {n["NodeID"] for n in ray_nodes if n.get("Alive", False)}
        changed = []
        for record in list(self.records.values()):
            health: Health
            if record.kind == "provider":
                if now is None:
                    continue
                health = P.heartbeat_health(record, now, self.settings.providers.heartbeat_ttl_s)
            else:
                health = "dead" if record.node_id not in alive else ("draining" if record.draining else "alive")
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
        """An audit of work these nodes served passed or failed. Returns the unknown ids."""
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

    def take_dirty_secrets(self) -> list[P.ProviderSecrets]:
        changed = [self.provider_secrets[i] for i in sorted(self.dirty_secrets) if i in self.provider_secrets]
        self.dirty_secrets.clear()
        return changed

    def _get(self, node_id: str) -> NodeRecord:
        try:
            return self.records[node_id]
        except KeyError as exc:
            raise KeyError(f"node {node_id} is not registered") from exc

    def _put(self, record: NodeRecord) -> None:
        self.records[record.node_id] = record
        self.dirty.add(record.node_id)

    def _put_secrets(self, secret: P.ProviderSecrets) -> None:
        old = self.provider_secrets.get(secret.provider_id)
        if old is not None:  # the old session token stops working
            self.sessions.pop(old.session_sha256, None)
        self.provider_secrets[secret.provider_id] = secret
        self.sessions[secret.session_sha256] = secret.provider_id
        self.dirty_secrets.add(secret.provider_id)


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
    """NodeRecords as JSON under `<prefix>/node/<node id>` in Ray's GCS internal KV; providers' secrets
    apart, under `<prefix>/provider-secret/<provider id>` (the KV is inside the operator's trust domain)."""

    def __init__(self, namespace: str, prefix: str) -> None:
        self.namespace = namespace
        self.prefix = f"{prefix}/node/"
        self.secrets_prefix = f"{prefix}/provider-secret/"

    def load_secrets(self) -> dict[str, P.ProviderSecrets]:
        from ray.experimental import internal_kv as kv

        loaded = {}
        for key in kv._internal_kv_list(self.secrets_prefix, namespace=self.namespace):
            try:
                secret = P.ProviderSecrets.from_json(json.loads(kv._internal_kv_get(key, namespace=self.namespace)))
            except (TypeError, ValueError, KeyError) as exc:
                logger.error("skipping unreadable provider secret entry %r: %s", key, type(exc).__name__)
                continue
            loaded[secret.provider_id] = secret
        return loaded

    def save_secrets(self, secrets: Sequence[P.ProviderSecrets]) -> None:
        from ray.experimental import internal_kv as kv

        for secret in secrets:
            kv._internal_kv_put(
                self.secrets_prefix + secret.provider_id, json.dumps(secret.to_json()), True, namespace=self.namespace
            )

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
        self._registry = NetworkRegistry(
            self._settings, records=self._store.load(), provider_secrets=self._store.load_secrets()
        )
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

    def register_operator(self, proof: JoinProof, capabilities: NodeCapabilities) -> NodeRecord:
        ray_node = next((n for n in ray.nodes() if n["NodeID"] == proof.challenge.node_id), None)
        record = self._registry.register_operator(proof, capabilities, ray_node, time.time())
        self._persist(force=True)
        return record

    def issue_provider_challenge(self, wallet: str, endpoint: str, cert_fingerprint: str) -> ProviderChallenge:
        return self._registry.issue_provider_challenge(wallet, endpoint, cert_fingerprint, time.time())

    def register_provider(
        self,
        proof_json: dict[str, Any],
        cert_pem: str,
        capabilities_json: dict[str, Any] | None,
        models: list[str],
        region: str = "",
        allowed_models: list[str] | None = None,
    ) -> P.ProviderRegistration:
        """Register a provider from its JSON proof (see NetworkRegistry.register_provider); the caller must not
        retry it (the nonce is spent by the first attempt)."""
        registration = self._registry.register_provider(
            proof_json, cert_pem, capabilities_json, models, time.time(), region, allowed_models
        )
        self._persist(force=True)
        return registration

    def provider_heartbeat(self, session_token: str) -> NodeRecord:
        before = self._registry.session_record(session_token).health
        record = self._registry.provider_heartbeat(session_token, time.time())
        self._persist(force=record.health != before)
        return record

    def provider_leave(self, session_token: str) -> NodeRecord:
        record = self._registry.provider_leave(session_token)
        self._persist(force=True)
        return record

    def provider_links(self, provider_ids: list[str]) -> dict[str, dict[str, str]]:
        """Operator-only (carries link tokens): never expose over HTTP."""
        return self._registry.provider_links(provider_ids)

    def set_draining(self, node_id: str, draining: bool = True) -> NodeRecord:
        record = self._registry.set_draining(node_id, draining)
        self._persist(force=True)
        return record

    def request_replan(self, models: list[str]) -> list[str]:
        return self._registry.request_replan(models)

    def take_replan_requests(self) -> list[str]:
        return self._registry.take_replan_requests()

    def sync_health(self) -> list[str]:
        changed = self._registry.sync_health(ray.nodes(), time.time())
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
        self._store.save_secrets(self._registry.take_dirty_secrets())  # before the records that use them
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
