"""Operator actions that reach beyond the gateway: drain (or undrain) a provider in the registry, the same
call `solanalm node leave` makes (cluster/network/join.py); `solanalm up`'s placement controller then moves
the drained node's stages (it re-plans when a planned node is draining)."""

import asyncio
from typing import Any

from cluster.config.network import NetworkSection
from serve_apps.gateway.errors import OpenAIError

CALL_TIMEOUT_S = 10.0


async def set_draining(gateway: Any, node_id: str, draining: bool) -> Any:
    """The registry record after marking `node_id` draining (or not); 503 without a registry, 404 unknown node."""
    from cluster.network.registry import call_registry, get_registry

    section: NetworkSection = getattr(gateway.providers, "section", None) or NetworkSection()
    namespace: str | None = getattr(gateway.providers, "namespace", None)

    def call() -> Any:
        try:
            registry = get_registry(section, namespace or "")
        except ValueError:
            raise OpenAIError(503, "no provider registry is running", code="registry_unavailable") from None
        try:
            return call_registry(registry, "set_draining", node_id, draining, timeout_s=CALL_TIMEOUT_S)
        except KeyError:
            raise OpenAIError(404, f"no provider {node_id!r} in the registry", "node_id", "not_found") from None

    return await asyncio.to_thread(call)
