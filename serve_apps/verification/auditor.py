"""The auditor: re-executes audited provider stages on the operator's reference weights, off the serving
path, and reports what it finds (operator domain, pinned to the head node like the registry).

`Auditor` is the logic (no Ray: a bounded queue of `AuditJob`s, a small cache of reference stage models,
a `Sanctions` object it reports to); `AuditorActor` runs it as the named Ray actor "solanalm-auditor",
and `RaySanctions` reports to the registry and payments actors:

- every verdict: `registry.record_verification([provider_id], passed)` (reputation: a failure moves it
  `verification_fail_step`, by default half-way, to 0);
- a failure: that request's payout to the provider's proven wallet is withheld
  (`payments.withhold_payout`), and the `solanalm_verification_failures` metric counts it;
- `failures_to_evict` failures of one provider: `registry.set_draining(provider_id)`, so placement gives
  it no new stages (reputation alone already drops below `min_eligible` after two failures from 0.5).

A full queue drops new jobs (counted): audits must never hold memory without bound, and a dropped audit is
indistinguishable, to the provider, from a sequence that was not sampled.
"""

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from serve_apps.engine.stage_model import StageModel, build_stage
from serve_apps.verification.audit import AuditedStage, AuditJob, AuditVerdict, judge, reexecute

logger = logging.getLogger(__name__)

AUDITOR_NAME = "solanalm-auditor"
WITHHOLD_ATTEMPTS = 5  # the settlement may land after the sequence ends (the gateway settles it)
WITHHOLD_BACKOFF_S = 1.0


@dataclass(frozen=True, slots=True)
class AuditorSettings:
    """Bounds of the auditor (proposed as VerificationSection fields; see the module docstring)."""

    max_queued: int = 64  # jobs waiting; beyond, new jobs are dropped (counted)
    max_models: int = 4  # reference stage models kept loaded (least recently used goes)
    failures_to_evict: int = 3  # failed audits of one provider before it is drained
    torch_threads: int = 1
    job_timeout_s: float = 300.0


class Sanctions(Protocol):
    """Where verdicts go (the registry and payments; a fake in tests)."""

    async def record(self, provider_id: str, passed: bool) -> None: ...

    async def withhold(self, request_id: str, wallet: str, reason: str) -> None: ...

    async def evict(self, provider_id: str, reason: str) -> None: ...


@dataclass
class AuditorStats:
    submitted: int = 0
    dropped_full: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    evicted: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)  # provider id -> failed audits
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=32))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recent"] = list(self.recent)
        return out


class ReferenceModels:
    """Reference stage models built from the operator's weights, by AuditedStage.key, least recently
    used evicted beyond `max_models`."""

    def __init__(self, max_models: int) -> None:
        self.max_models = max(1, max_models)
        self._models: OrderedDict[tuple[Any, ...], StageModel] = OrderedDict()
        self.loads = 0

    def get(self, stage: AuditedStage) -> StageModel:
        key = stage.key
        model = self._models.get(key)
        if model is None:
            config = stage.config
            model = build_stage(Path(config.model_dir), config.spec, getattr(torch, config.dtype))
            # Low-bit copies as the stage has them; which rows use them is the job's (reexecute).
            model.quantize(config.weight_quant, config.low_bit_max_tokens)
            self._models[key] = model
            self.loads += 1
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        self._models.move_to_end(key)
        return model


class Auditor:
    """Queue, re-execute, judge, report. `run_pending` is driven by the actor's worker task."""

    def __init__(self, sanctions: Sanctions, settings: AuditorSettings | None = None) -> None:
        self.settings = settings or AuditorSettings()
        self.sanctions = sanctions
        self.models = ReferenceModels(self.settings.max_models)
        self.queue: deque[AuditJob] = deque()
        self.stats = AuditorStats()

    def submit(self, jobs: Sequence[AuditJob]) -> int:
        """Queue jobs; returns how many were accepted (the rest are dropped: the queue is full)."""
        accepted = 0
        for job in jobs:
            self.stats.submitted += 1
            if len(self.queue) >= self.settings.max_queued:
                self.stats.dropped_full += 1
                continue
            self.queue.append(job)
            accepted += 1
        return accepted

    def verify(self, job: AuditJob) -> AuditVerdict:
        """Re-execute and judge one job (CPU-bound: the actor runs it in a thread)."""
        torch.set_num_threads(max(1, self.settings.torch_threads))
        model = self.models.get(job.stage)
        return judge(job, reexecute(model, job).float())

    async def report(self, job: AuditJob, verdict: AuditVerdict) -> None:
        provider = job.stage.provider_id
        self.stats.recent.append({"request_id": job.request_id, **asdict(verdict)})
        if verdict.passed:
            self.stats.passed += 1
            await self.sanctions.record(provider, True)
            return
        self.stats.failed += 1
        failures = self.stats.failures[provider] = self.stats.failures.get(provider, 0) + 1
        logger.warning(
            "audit of %s failed: provider %s, layers %d-%d, %s",
            job.request_id,
            provider,
            verdict.layer_start,
            verdict.layer_end,
            verdict.reason,
        )
        record_failure_metric(job.stage.model, job.stage.wallet)
        await self.sanctions.record(provider, False)
        if job.stage.wallet:
            await self.sanctions.withhold(job.request_id, job.stage.wallet, f"audit failed: {verdict.reason}")
        if failures >= self.settings.failures_to_evict and provider not in self.stats.evicted:
            self.stats.evicted.append(provider)
            await self.sanctions.evict(provider, f"{failures} failed audits")

    async def run_one(self) -> AuditVerdict | None:
        """Verify and report the oldest queued job (None when the queue is empty or the job broke)."""
        if not self.queue:
            return None
        job = self.queue.popleft()
        try:
            verdict = await asyncio.wait_for(asyncio.to_thread(self.verify, job), self.settings.job_timeout_s)
        except Exception:  # noqa: BLE001 - one broken job must not stop the auditor
            self.stats.errors += 1
            logger.exception("audit job of %s (provider %s) could not run", job.request_id, job.stage.provider_id)
            return None
        try:
            await self.report(job, verdict)
        except Exception:  # noqa: BLE001 - the verdict stands (counted) even when reporting fails
            logger.exception("could not report the audit of %s", job.request_id)
        return verdict


def record_failure_metric(model: str, wallet: str | None) -> None:
    """solanalm_verification_failures{model, provider_wallet} (+1); a metric never breaks an audit."""
    try:
        from serve_apps.metrics import record_verification_failure

        record_verification_failure(model or "unknown", wallet or "operator")
    except Exception:  # noqa: BLE001
        logger.exception("could not record the verification-failure metric")


class RaySanctions:
    """Sanctions through the registry actor and the payments actor (each call with a timeout; a missing
    actor is logged and skipped)."""

    def __init__(self, network: dict[str, Any], payments: dict[str, Any] | None, namespace: str) -> None:
        """`payments`: the payments actor's `actor_name` and `actor_call_timeout_s` (None: no withholding).
        Only those two are kept: this object is an actor's constructor argument, stored by Ray, so it
        must never carry the payments section's secrets (pass just the two keys)."""
        from cluster.config.network import NetworkSection

        self.network = NetworkSection.model_validate(network)
        self.payments_actor = str(payments["actor_name"]) if payments else None
        self.payments_timeout_s = float((payments or {}).get("actor_call_timeout_s", 10.0))
        self.namespace = namespace

    def _registry(self) -> Any:
        import ray

        try:
            return ray.get_actor(self.network.registry_name, namespace=self.namespace)
        except ValueError:
            return None

    async def record(self, provider_id: str, passed: bool) -> None:
        registry = self._registry()
        if registry is None:
            logger.info("no registry: audit outcome of %s not recorded", provider_id)
            return
        call = registry.record_verification.remote([provider_id], passed)
        unknown = await asyncio.wait_for(call, self.network.registry_call_timeout_s)
        if unknown:
            logger.info("audit outcome of unregistered provider %s not recorded", unknown)

    async def evict(self, provider_id: str, reason: str) -> None:
        registry = self._registry()
        if registry is None:
            return
        logger.warning("draining provider %s: %s", provider_id, reason)
        await asyncio.wait_for(registry.set_draining.remote(provider_id, True), self.network.registry_call_timeout_s)

    async def withhold(self, request_id: str, wallet: str, reason: str) -> None:
        if self.payments_actor is None:
            return
        import ray

        from payments.client import PaymentsClient
        from payments.errors import NotFound
        from payments.protocol import WithholdPayout

        try:
            client = PaymentsClient(
                ray.get_actor(self.payments_actor, namespace=self.namespace), self.payments_timeout_s
            )
        except ValueError:
            logger.info("no payments actor: payout of %s not withheld", request_id)
            return
        for attempt in range(1, WITHHOLD_ATTEMPTS + 1):
            try:
                result = await client.withhold_payout(WithholdPayout(request_id, (wallet,), reason))
            except NotFound:  # not settled yet: the gateway settles when the client got its answer
                if attempt == WITHHOLD_ATTEMPTS:
                    logger.warning("payout of %s to %s not withheld: no settlement", request_id, wallet)
                    return
                await asyncio.sleep(WITHHOLD_BACKOFF_S * attempt)
                continue
            if result.too_late:
                logger.warning("payout of %s to %s was already batched: not withheld", request_id, wallet)
            return


class AuditorActor:
    """The auditor as a Ray actor (async: `submit` and `stats` answer while a job runs in a thread)."""

    def __init__(self, sanctions: Sanctions, settings: AuditorSettings | None = None) -> None:
        self._auditor = Auditor(sanctions, settings)
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._busy = False
        self.started = time.time()

    async def submit(self, jobs: list[AuditJob]) -> int:
        """Queue jobs for re-execution; returns how many were accepted (the rest were dropped)."""
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        accepted = self._auditor.submit(jobs)
        self._wakeup.set()
        return accepted

    async def stats(self) -> dict[str, Any]:
        out = self._auditor.stats.to_dict()
        out.update(queued=len(self._auditor.queue), busy=self._busy, models_loaded=self._auditor.models.loads)
        return out

    async def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until the queue is empty and no job runs (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._auditor.queue or self._busy:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _run(self) -> None:
        wakeup = self._wakeup
        if wakeup is None:
            return
        while True:
            await wakeup.wait()
            wakeup.clear()
            while self._auditor.queue:
                self._busy = True
                try:
                    await self._auditor.run_one()
                finally:
                    self._busy = False


def get_or_create_auditor(
    sanctions: Sanctions, namespace: str, settings: AuditorSettings | None = None, name: str = AUDITOR_NAME
) -> Any:
    """The cluster's auditor actor, created (detached, restarted on failure) if missing, pinned to the
    head node: the operator's machine (a provider node must never audit, least of all itself)."""
    import ray

    from cluster.network.registry import HEAD_NODE_RESOURCE

    actor_cls: Any = ray.remote(AuditorActor)
    handle = actor_cls.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=16,
        num_cpus=0,
        resources={HEAD_NODE_RESOURCE: 0.001},
        # Created from a pipeline replica, whose placement group would otherwise capture it.
        scheduling_strategy="DEFAULT",
    ).remote(sanctions, settings)
    return handle
