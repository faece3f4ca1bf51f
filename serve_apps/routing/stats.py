"""The replica side of routing: its routing stats from the registry, and request outcomes back to it.

A replica reads the registry's records of its own stages' nodes (at most every `refresh_s`, with a
timeout; a missing registry means "no score", so routers fall back to power of two choices) and
reports each finished request's outcome and latency to the registry without waiting for it.
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import ray

from cluster.config.network import NetworkSection
from cluster.network.local_node import is_operator_record
from cluster.network.records import NodeRecord
from serve_apps.routing.ranking import ReplicaStats, score_of

logger = logging.getLogger(__name__)


class RegistryLink:
    """A replica's link to the provider registry (named actor); every failure is logged, never raised."""

    def __init__(self, network: NetworkSection, namespace: str, refresh_s: float = 1.0) -> None:
        self.network = network
        self.namespace = namespace
        self.refresh_s = refresh_s
        self._handle: Any = None
        self._records: dict[str, NodeRecord] | None = None
        self._fetched_at = -float("inf")

    def _registry(self) -> Any:
        if self._handle is None:
            try:
                self._handle = ray.get_actor(self.network.registry_name, namespace=self.namespace)
            except ValueError:
                return None
        return self._handle

    async def records(self) -> dict[str, NodeRecord] | None:
        """The registry's node records (cached for refresh_s); None when no registry answers."""
        if time.monotonic() - self._fetched_at < self.refresh_s:
            return self._records
        registry = await asyncio.to_thread(self._registry)
        if registry is None:
            return None
        try:
            listed = await asyncio.wait_for(registry.list_nodes.remote(False), self.network.registry_call_timeout_s)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            logger.warning("registry unreachable for routing stats: %s", exc)
            self._handle = None
            return None
        # The operator's own node (registered by `solanalm up`) scores as before, as a node the registry
        # does not know, so registering it changes no routing.
        prefix = self.network.label_prefix
        self._records = {r.node_id: r for r in listed if not is_operator_record(r, prefix)}
        self._fetched_at = time.monotonic()
        return self._records

    async def routing_stats(self, replica_id: str, node_ids: Sequence[str], queued: int, running: int) -> dict:
        """What `record_routing_stats` returns: this pipeline's nodes, load and score (None: no registry)."""
        records = await self.records()
        score = None
        if records is not None and node_ids:
            score = score_of(node_ids, records, self.network.routing, queued + running, self.network.reputation.initial)
        return ReplicaStats(replica_id, tuple(node_ids), queued, running, score).to_dict()

    def record_request(self, node_ids: Sequence[str], ok: bool, latency_s: float) -> None:
        """Tell the registry a request finished (fire and forget: the answer never waits for it)."""
        registry = self._handle
        if registry is None or not node_ids:
            return
        try:
            registry.record_request.remote(list(node_ids), ok, latency_s)
        except ray.exceptions.RayError as exc:
            logger.warning("could not report a request to the registry: %s", exc)
