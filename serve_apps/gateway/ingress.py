"""The Ray Serve ingress deployment wrapping the FastAPI gateway."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import SecretStr
from ray import serve

from cluster.config.network import NetworkSection
from cluster.config.observability import LoggingSection
from cluster.config.payments import PaymentsSection
from cluster.config.rate_limits import RateLimitsSection
from cluster.observability.logs import configure_logging
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.backend import ServeHandleBackend
from serve_apps.gateway.current import set_current
from serve_apps.gateway.limits import RequestLimiter
from serve_apps.gateway.metering import Metering
from serve_apps.gateway.providers import RegistryProviders

gateway_app = create_gateway_app()


@serve.deployment(name="gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress(gateway_app)
class OpenAIIngress:
    """Routes OpenAI requests to one PipelineServer deployment per model; meters them when payments are on."""

    def __init__(
        self,
        pipelines: dict,
        cards: list[ModelCard],
        request_timeout_s: float,
        max_body_bytes: int,
        rate_limits: RateLimitsSection,
        payments: PaymentsSection,
        namespace: str,
        network: NetworkSection,
        logging_section: LoggingSection | None = None,
        operator_token: SecretStr | None = None,
    ) -> None:
        configure_logging(logging_section or LoggingSection())
        metering = Metering(_payments_client(payments, namespace), payments.operator_wallet)
        limiter = RequestLimiter(rate_limits)
        nodes = registry_nodes_source(network, namespace)
        providers = RegistryProviders(network, namespace)  # out-of-cluster providers register through it
        backend = ServeHandleBackend(pipelines)
        gateway = Gateway(backend, cards, request_timeout_s, metering, limiter, nodes, providers, operator_token)
        set_current(gateway, max_body_bytes)


def registry_nodes_source(section: NetworkSection, namespace: str) -> Callable[[], Awaitable[list[dict[str, Any]]]]:
    """Reads the provider registry's node records (LookupError when no registry runs)."""
    from cluster.network.registry import call_registry, get_registry

    def read() -> list[dict[str, Any]]:
        try:
            registry = get_registry(section, namespace)
        except ValueError:
            raise LookupError("no provider registry is running (start one with `solanalm node registry`)") from None
        records = call_registry(registry, "list_nodes", timeout_s=section.registry_call_timeout_s)
        return [record.to_json() for record in records]

    async def nodes() -> list[dict[str, Any]]:
        return await asyncio.to_thread(read)

    return nodes


def _payments_client(section: PaymentsSection, namespace: str) -> Any:
    if not section.enabled:
        return None
    from payments.client import PaymentsClient, start_payments_workers

    # Named and detached: every gateway replica shares the payments workers (and their one ledger).
    return PaymentsClient(start_payments_workers(section, namespace=namespace), section.actor_call_timeout_s)
