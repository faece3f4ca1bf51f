"""Operator actions that reach beyond the gateway: drain (or undrain) a provider in the registry, the same
call `solanalm node leave` makes (cluster/network/join.py); `solanalm up`'s placement controller then moves
the drained node's stages (it re-plans when a planned node is draining); and ask that controller to re-plan a
served model over the providers' current figures (`request_replan`, taken on its next round)."""

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from cluster.config.network import NetworkSection
from serve_apps.gateway.errors import OpenAIError

CALL_TIMEOUT_S = 10.0
T = TypeVar("T")


async def set_draining(gateway: Any, node_id: str, draining: bool) -> Any:
    """The registry record after marking `node_id` draining (or not); 503 without a registry, 404 unknown node."""

    def call(registry: Any) -> Any:
        from cluster.network.registry import call_registry

        try:
            return call_registry(registry, "set_draining", node_id, draining, timeout_s=CALL_TIMEOUT_S)
        except KeyError:
            raise OpenAIError(404, f"no provider {node_id!r} in the registry", "node_id", "not_found") from None

    return await _on_registry(gateway, call)


async def request_replan(gateway: Any, model: str) -> list[str]:
    """Ask the placement controller to re-plan `model` (a model this gateway serves, else 404); every model
    asked and not yet taken. 503 without a registry."""
    served = {entry["id"] for entry in gateway.list_models()["data"]}
    if model not in served:
        raise OpenAIError(404, f"model {model!r} is not served here", "model", "model_not_found")

    def call(registry: Any) -> list[str]:
        from cluster.network.registry import call_registry

        asked: list[str] = call_registry(registry, "request_replan", [model], timeout_s=CALL_TIMEOUT_S)
        return asked

    return await _on_registry(gateway, call)


async def _on_registry(gateway: Any, call: Callable[[Any], T]) -> T:
    """`call(registry handle)` in a worker thread; 503 when no registry runs."""
    from cluster.network.registry import get_registry

    section: NetworkSection = getattr(gateway.providers, "section", None) or NetworkSection()
    namespace: str | None = getattr(gateway.providers, "namespace", None)

    def run() -> T:
        try:
            registry = get_registry(section, namespace or "")
        except ValueError:
            raise OpenAIError(503, "no provider registry is running", code="registry_unavailable") from None
        return call(registry)

    return await asyncio.to_thread(run)
