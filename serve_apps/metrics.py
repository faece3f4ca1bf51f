"""Every serving metric of SolanaLM and the small functions that record them.

Recorded where the information is: the gateway (requests, tokens, TTFT, time per output token), the
replica (queue, running sequences, KV slots, engine steps: sampled by a periodic task), the stage actors
(forward latency per stage) and the network helper (verification failures). Exported by Ray's Prometheus
endpoint on each node as `ray_<name>` (see cluster/observability/metrics.py); docs/operations.md lists them.
"""

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

from cluster.observability.metrics import LATENCY_BUCKETS_S, MetricSet, MetricSpec
from serve_apps.protocol import Finished, GenerateEvent, TextDelta

logger = logging.getLogger(__name__)

REQUESTS = "solanalm_requests"
PROMPT_TOKENS = "solanalm_prompt_tokens"
COMPLETION_TOKENS = "solanalm_completion_tokens"
TTFT = "solanalm_ttft_seconds"
TPOT = "solanalm_time_per_output_token_seconds"
STAGE_FORWARD = "solanalm_stage_forward_seconds"
QUEUE_DEPTH = "solanalm_queue_depth"
RUNNING = "solanalm_running_sequences"
KV_USED = "solanalm_kv_slots_used"
KV_TOTAL = "solanalm_kv_slots_total"
ENGINE_STEPS = "solanalm_engine_steps"
VERIFICATION_FAILURES = "solanalm_verification_failures"

# Per-token latencies are far below a request's: 1 ms .. 10 s.
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(
        REQUESTS,
        "counter",
        "Requests answered by the gateway, by model and outcome: ok, error (failed after it was accepted),"
        " aborted (client gone) or the HTTP status of a rejection (400, 402, 404, 429, 503, ...).",
        ("model", "status"),
    ),
    MetricSpec(PROMPT_TOKENS, "counter", "Prompt tokens of finished requests.", ("model",)),
    MetricSpec(COMPLETION_TOKENS, "counter", "Completion tokens generated for finished requests.", ("model",)),
    MetricSpec(
        TTFT, "histogram", "Time to first token (s): gateway dispatch to the first text.", ("model",), LATENCY_BUCKETS_S
    ),
    MetricSpec(
        TPOT,
        "histogram",
        "Time per output token (s) after the first: (finish - first token) / (completion tokens - 1).",
        ("model",),
        TOKEN_BUCKETS_S,
    ),
    MetricSpec(
        STAGE_FORWARD,
        "histogram",
        "Forward latency of one pipeline stage for one step (s), measured inside the stage actor.",
        ("model", "stage"),
        TOKEN_BUCKETS_S,
    ),
    MetricSpec(QUEUE_DEPTH, "gauge", "Requests waiting for a KV slot in a replica.", ("model",)),
    MetricSpec(RUNNING, "gauge", "Sequences resident (prefilling or decoding) in a replica.", ("model",)),
    MetricSpec(KV_USED, "gauge", "KV-cache slots in use in a replica (one per resident sequence).", ("model",)),
    MetricSpec(KV_TOTAL, "gauge", "KV-cache slots of a replica (max_num_seqs).", ("model",)),
    MetricSpec(ENGINE_STEPS, "counter", "Pipeline steps (prefill or decode batches) run by a replica.", ("model",)),
    MetricSpec(
        VERIFICATION_FAILURES,
        "counter",
        "Audits whose re-execution disagreed with the provider's answer, by model and provider wallet.",
        ("model", "provider_wallet"),
    ),
)


# In-process listeners of every recording (name, method, value, tags): the dashboard's live figures
# (serve_apps/dashboard) read the gateway's own requests, tokens and latencies here, without a scrape.
TAPS: list[Callable[[str, str, float, dict[str, str]], None]] = []


class _ServeMetricSet(MetricSet):
    """Serve's metric classes where Serve is loaded (they add the deployment, replica and application tags
    inside a replica); Ray's plain ones elsewhere (stage actors do not import Serve just for metrics)."""

    def _record(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        super()._record(name, method, value, tags)
        for tap in TAPS:
            with contextlib.suppress(Exception):  # a listener must not fail a request
                tap(name, method, value, tags)

    def _create(self, name: str) -> Any:
        if self._flavour is None and "ray.serve" in sys.modules:
            from ray.serve import metrics

            self._flavour = metrics
        return super()._create(name)


METRICS: MetricSet = _ServeMetricSet(SPECS)


def record_request(model: str, status: str) -> None:
    """One request answered: status `ok`, `error`, `aborted` or a rejection's HTTP status."""
    METRICS.inc(REQUESTS, 1, model=model, status=status)


def record_finished(model: str, finished: Finished, first_token_at: float | None, finished_at: float) -> None:
    """Token counters and time per output token of a finished request."""
    METRICS.inc(PROMPT_TOKENS, finished.prompt_tokens, model=model)
    METRICS.inc(COMPLETION_TOKENS, finished.completion_tokens, model=model)
    if first_token_at is not None and finished.completion_tokens > 1:
        per_token = (finished_at - first_token_at) / (finished.completion_tokens - 1)
        METRICS.observe(TPOT, max(0.0, per_token), model=model)


def record_stage_forward(model: str, stage_index: int, seconds: float) -> None:
    METRICS.observe(STAGE_FORWARD, seconds, model=model, stage=str(stage_index))


def record_verification_failure(model: str, provider_wallet: str) -> None:
    """An audit found a provider's answer wrong (the auditor calls this)."""
    METRICS.inc(VERIFICATION_FAILURES, 1, model=model, provider_wallet=provider_wallet or "none")


async def observe_events(
    model: str, started_at: float, events: AsyncIterator[GenerateEvent]
) -> AsyncIterator[GenerateEvent]:
    """Pass a request's events through, recording TTFT, tokens, TPOT and the request's outcome."""
    first_at: float | None = None
    outcome: str | None = None
    try:
        async for event in events:
            if isinstance(event, TextDelta) and first_at is None:
                first_at = time.perf_counter()
                METRICS.observe(TTFT, first_at - started_at, model=model)
            elif isinstance(event, Finished) and outcome is None:
                outcome = "error" if event.finish_reason == "error" else "ok"
                if outcome == "ok":
                    record_finished(model, event, first_at, time.perf_counter())
                record_request(model, outcome)
                _log_outcome(model, outcome, started_at, first_at, event)
            yield event
    except Exception:
        if outcome is None:
            outcome = "error"
            record_request(model, outcome)
            _log_outcome(model, outcome, started_at, first_at, None)
        raise
    finally:
        if outcome is None:  # closed before a Finished: the client went away or the stream was cancelled
            record_request(model, "aborted")
            _log_outcome(model, "aborted", started_at, first_at, None)


def _log_outcome(
    model: str, outcome: str, started_at: float, first_at: float | None, finished: Finished | None
) -> None:
    """One INFO line per request (an access log; with JSON logs it carries the request id)."""
    fields: dict[str, object] = {"model": model, "outcome": outcome, "duration_s": time.perf_counter() - started_at}
    if first_at is not None:
        fields["ttft_s"] = first_at - started_at
    if finished is not None:
        fields.update(
            finish_reason=finished.finish_reason,
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=finished.completion_tokens,
        )
    logger.info("request %s", outcome, extra=fields)


class EngineGauges:
    """Samples a replica's engine (queue, running, KV slots, steps) every `interval_s` into gauges."""

    def __init__(self, model: str, engine: Any, interval_s: float = 1.0) -> None:
        self.model = model
        self.engine = engine
        self.interval_s = interval_s
        self._last_steps = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        scheduler = self.engine.scheduler
        running = len(scheduler.running)
        METRICS.set(QUEUE_DEPTH, scheduler.num_waiting, model=self.model)
        METRICS.set(RUNNING, running, model=self.model)
        METRICS.set(KV_USED, running, model=self.model)
        METRICS.set(KV_TOTAL, scheduler.limits.num_slots, model=self.model)
        steps = int(self.engine.steps)
        METRICS.inc(ENGINE_STEPS, steps - self._last_steps, model=self.model)
        self._last_steps = steps

    def ensure_started(self) -> None:
        """Start the sampling task on the running loop (idempotent; called from the replica's handlers)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-gauges")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a sampling error must not end the loop
                self.sample()
            await asyncio.sleep(self.interval_s)


def stage_model_label(actor_name: str, model_dir: str) -> str:
    """The model tag of a stage actor: its name is `stage:<model>:<replica>:<index>:<layers>` (server/stages.py)."""
    parts = actor_name.split(":")
    if len(parts) >= 2 and parts[0] == "stage" and parts[1]:
        return parts[1]
    return model_dir.rstrip("/").rsplit("/", 1)[-1]


# Set in the request's task once the replica accepted it: from then on `observe_events` counts the
# outcome, before it the gateway counts the rejection (so each request is counted once).
_ACCEPTED: ContextVar[bool] = ContextVar("solanalm_request_accepted", default=False)


def mark_accepted() -> None:
    _ACCEPTED.set(True)


def record_rejection(model: str, status: int) -> None:
    """A request answered with an error before a replica accepted it (after: `observe_events` counts it)."""
    if not _ACCEPTED.get():
        record_request(model, str(status))
