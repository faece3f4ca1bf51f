"""What a verdict changes: reputation in the registry, the served providers' payout, a metric.

A passed check raises the reputation of every node of both pipelines; a failed one lowers only the
culprits' (the referee pinned them) and withholds the payout of the culprits on the served pipeline
(a culprit on the checking pipeline was never paid for the re-execution). Inconclusive: nothing.
"""

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import ray

from cluster.config.network import NetworkSection
from serve_apps.protocol import GenerateRequest
from serve_apps.verification.protocol import TraceResult, Verdict

logger = logging.getLogger(__name__)

# (request_id, provider wallets (None: the operator's node), reason) -> whatever payments answered
Withhold = Callable[[str, Sequence[str | None], str], Awaitable[Any]]


class VerificationReporter:
    """The Verifier's reporter over the registry actor, a withhold callable and the metrics module."""

    def __init__(self, network: NetworkSection, namespace: str, withhold: Withhold | None) -> None:
        self.network = network
        self.namespace = namespace
        self.withhold = withhold

    async def __call__(
        self, request: GenerateRequest, verdict: Verdict, served: TraceResult, other: TraceResult
    ) -> None:
        if verdict.outcome == "passed":
            nodes = {s.node_id for trace in (served, other) for s in trace.stages}
            await self.record(sorted(nodes), passed=True)
            return
        if verdict.outcome != "failed":
            return
        await self.record(sorted({c.node_id for c in verdict.culprits}), passed=False)
        served_culprits = verdict.served_culprits
        if served_culprits and self.withhold is not None:
            wallets = sorted({c.wallet for c in served_culprits}, key=lambda w: w or "")
            await self.withhold(request.request_id, wallets, f"spot-check failed: {verdict.detail}")
        for culprit in verdict.culprits:
            record_failure_metric(request.model, culprit.wallet)

    async def record(self, node_ids: list[str], passed: bool) -> None:
        """registry.record_verification(node_ids, passed); logged and skipped when no registry runs."""
        if not node_ids:
            return
        try:
            registry = await asyncio.to_thread(ray.get_actor, self.network.registry_name, namespace=self.namespace)
        except ValueError:
            logger.info("no registry: spot-check outcome for %s not recorded", node_ids)
            return
        unknown: list[str] = await asyncio.wait_for(
            registry.record_verification.remote(node_ids, passed), self.network.registry_call_timeout_s
        )
        if unknown:
            logger.info("spot-check outcome for unregistered nodes %s not recorded", unknown)


def record_failure_metric(model: str, wallet: str | None) -> None:
    """serve_apps.metrics.record_verification_failure(model, provider_wallet), when that module exists."""
    try:
        metrics = importlib.import_module("serve_apps.metrics")
    except ImportError:
        return
    record = getattr(metrics, "record_verification_failure", None)
    if record is None:
        return
    try:
        record(model, wallet or "operator")
    except Exception:  # noqa: BLE001 - a metric must never break reporting
        logger.exception("could not record the verification-failure metric")
