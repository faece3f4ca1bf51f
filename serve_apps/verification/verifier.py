"""The gateway's spot-checker: after a sampled request is answered (and settled), trace it on the
replica that served it and on a different one, compare, ask the referee about a disagreement, then
report: reputation to the registry, withheld payout to payments, a metric if the metrics module exists.

Runs in background tasks: the client's answer never waits, and nothing here is metered (the client is
not charged for the re-execution). At most `max_concurrent` checks run at once and `max_queued` wait;
further samples are skipped (counted), never queued without bound.
"""

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.config.network import NetworkSection
from serve_apps.protocol import GenerateRequest
from serve_apps.routing.ranking import ROUTING_HINT_KWARG, RoutingHint, hint_violation
from serve_apps.verification.judge import first_mismatch, judge, precheck
from serve_apps.verification.protocol import TraceRequest, TraceResult, Verdict
from serve_apps.verification.reporting import VerificationReporter, Withhold

logger = logging.getLogger(__name__)
TRACE_ATTEMPTS = 4  # a pinned/avoiding trace refused by the replica FIFO routing picked is sent again

# (served trace, disputed stage index, fingerprint dims) -> the stage's reference fingerprint
Referee = Callable[[TraceResult, int, int], Awaitable[tuple[float, ...]]]
Reporter = Callable[[GenerateRequest, Verdict, TraceResult, TraceResult], Awaitable[None]]


@dataclass
class VerifierStats:
    sampled: int = 0
    skipped_busy: int = 0
    passed: int = 0
    failed: int = 0
    inconclusive: int = 0
    recent: deque[tuple[str, Verdict]] = field(default_factory=lambda: deque(maxlen=64))


class Verifier:
    """Samples finished requests and spot-checks them in the background."""

    def __init__(
        self,
        handles: dict[str, Any],
        network: NetworkSection,
        referee: Referee,
        reporter: Reporter,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.handles = handles  # model -> DeploymentHandle of its PipelineServer deployment
        self.network = network
        self.settings = network.verification
        self.referee = referee
        self.reporter = reporter
        self.sample = sample
        self.stats = VerifierStats()
        self._tasks: set[asyncio.Task[Verdict]] = set()
        self._slots: asyncio.Semaphore | None = None  # created on the event loop, at the first check

    def submit(self, request: GenerateRequest, served_replica: str, completion: str) -> asyncio.Task[Verdict] | None:
        """Maybe start a background spot-check of a finished request; returns its task if started."""
        if not served_replica or request.model not in self.handles:
            return None
        if self.sample() >= self.network.verification_fraction:
            return None
        self.stats.sampled += 1
        if len(self._tasks) >= self.settings.max_concurrent + self.settings.max_queued:
            self.stats.skipped_busy += 1
            return None
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent)
        task = asyncio.get_running_loop().create_task(
            self._verify_in_slot(self._slots, request, served_replica, completion)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _verify_in_slot(
        self, slots: asyncio.Semaphore, request: GenerateRequest, served_replica: str, completion: str
    ) -> Verdict:
        async with slots:
            return await self.verify(request, served_replica, completion)

    async def verify(self, request: GenerateRequest, served_replica: str, completion: str) -> Verdict:
        """Trace, compare, referee, report; never raises (a broken check is 'inconclusive')."""
        try:
            verdict, served, other = await self._check(request, served_replica, completion)
        except Exception as exc:  # noqa: BLE001 - a background check must not crash the gateway
            logger.warning("spot-check of %s could not run: %s: %s", request.request_id, type(exc).__name__, exc)
            verdict, served, other = Verdict("inconclusive", f"{type(exc).__name__}: {exc}"), None, None
        self._count(request.request_id, verdict)
        if served is not None and other is not None:
            try:
                await self.reporter(request, verdict, served, other)
            except Exception:  # noqa: BLE001
                logger.exception("could not report the spot-check of %s", request.request_id)
        return verdict

    async def _check(
        self, request: GenerateRequest, served_replica: str, completion: str
    ) -> tuple[Verdict, TraceResult | None, TraceResult | None]:
        handle = self.handles[request.model]
        first = TraceRequest(
            request.request_id,
            request=request,
            completion=completion,
            max_tokens=self.settings.max_tokens,
            fingerprint_dims=self.settings.fingerprint_dims,
            keep_inputs=True,
        )
        served = await self._trace(handle, first, RoutingHint(pin_replica=served_replica))
        again = TraceRequest(
            request.request_id,
            token_ids=served.token_ids,
            max_tokens=self.settings.max_tokens,
            fingerprint_dims=self.settings.fingerprint_dims,
        )
        other = await self._trace(handle, again, RoutingHint(avoid_replica=served_replica))
        early = precheck(served, other)
        if early is not None:
            return early, served, other
        stage = first_mismatch(served, other, self.settings.tolerance)
        reference = None
        if stage is not None:
            reference = await asyncio.wait_for(
                self.referee(served, stage, self.settings.fingerprint_dims), self.settings.timeout_s
            )
        return judge(served, other, stage, reference, self.settings.tolerance), served, other

    async def _trace(self, handle: Any, request: TraceRequest, hint: RoutingHint) -> TraceResult:
        """The trace on a replica the hint allows; a refusal (FIFO routing handed the call to another
        replica) is retried a few times before it counts."""
        attempt = 1
        while True:
            call = handle.trace.remote(request, **{ROUTING_HINT_KWARG: hint})
            result: TraceResult = await asyncio.wait_for(call, self.settings.timeout_s)
            refused = result.error is not None and hint_violation(hint, result.replica_id) is not None
            if not refused or attempt >= TRACE_ATTEMPTS:
                return result
            attempt += 1

    def _count(self, request_id: str, verdict: Verdict) -> None:
        if verdict.outcome == "passed":
            self.stats.passed += 1
        elif verdict.outcome == "failed":
            self.stats.failed += 1
        else:
            self.stats.inconclusive += 1
        self.stats.recent.append((request_id, verdict))
        log = logger.warning if verdict.outcome == "failed" else logger.info
        log("spot-check of %s: %s (%s)", request_id, verdict.outcome, verdict.detail)

    async def drain(self) -> None:
        """Wait for the running checks (tests, shutdown)."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def build_verifier(
    handles: dict[str, Any], network: NetworkSection, namespace: str, withhold: Withhold | None
) -> Verifier | None:
    """The gateway's verifier over the pipeline deployments' handles (None when the fraction is 0)."""
    if network.verification_fraction <= 0:
        return None

    async def referee(served: TraceResult, stage: int, dims: int) -> tuple[float, ...]:
        from serve_apps.verification.referee import run_referee  # torch + transformers: only when needed

        return await run_referee(served, stage, dims, network.verification.referee_num_cpus)

    return Verifier(handles, network, referee, VerificationReporter(network, namespace, withhold))
