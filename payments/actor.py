"""The payments actor: a named, detached Ray actor serving one PaymentsService to every gateway.

Ledger calls run on one worker thread (SQLite has one writer anyway); usage reports are
group-committed; a background loop settles payouts every `settle_interval_s`, another releases
orphaned holds every `hold_sweep_interval_s`. On start the actor
first finishes whatever batches a previous incarnation left open (crash recovery).

With `payments.workers > 1` (PostgreSQL only) there are that many of these actors, worker `i` named
`section.worker_actor_name(i)`, each with its own engine on the shared ledger; every one runs the loops, and
the settlement lease lets one settle at a time. On the litesvm backend they share one chain actor.
"""

import asyncio
import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster.config.payments import PaymentsSection
from payments.chain.base import ChainBackend
from payments.forwarding import AsyncCall, forward_missing
from payments.group_commit import GroupCommitter
from payments.protocol import BatchReport, ReconcileReport, SettlementRecord, TrainingReward, UsageReport
from payments.service import PaymentsService
from payments.settlement import CrashHook, _no_crash

logger = logging.getLogger(__name__)


def _served(name: str) -> AsyncCall:
    """The actor's method for the PaymentsAPI call `name`: a synchronous service call runs on the ledger's
    one thread, an asynchronous one (chain, settlement) on the actor's event loop."""

    async def call(self: "PaymentsActor", *args: Any) -> Any:
        method = getattr(await self._svc(), name)
        if inspect.iscoroutinefunction(method):
            return await method(*args)
        return await self._run(method, *args)

    return call


@forward_missing(_served)
class PaymentsActor:
    """Ray actor class (wrapped with `ray.remote` in `payments.client.start_payments_actor`).

    Every PaymentsAPI call it does not define below is served from the service by `_served`.
    """

    def __init__(
        self,
        section: PaymentsSection,
        settle_loop: bool = True,
        crash_hook: CrashHook | None = None,
        worker: int = 0,
        namespace: str | None = None,
    ) -> None:
        self.section = section
        self.worker = worker
        self.namespace = namespace  # the workers' own: the shared chain actor is started there too
        self._crash_hook = crash_hook
        self._settle_loop_enabled = settle_loop
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="payments-db")
        self._service: PaymentsService | None = None
        self._committer: GroupCommitter | None = None
        self._ready = asyncio.Lock()
        self._settle_lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None

    async def _svc(self) -> PaymentsService:
        async with self._ready:
            if self._service is None:
                service = await PaymentsService.create(
                    self.section, self._shared_chain(), crash_hook=self._crash_hook or _no_crash, worker=self.worker
                )
                report = await service.recover()
                logger.info("payments actor recovered: %s", report)
                self._committer = GroupCommitter(service.report_usage_many, self.section.group_commit_max, self._db)
                self._service = service
                if self._settle_loop_enabled:
                    self._loop_task = asyncio.create_task(self._settle_forever())
                    self._sweep_task = asyncio.create_task(self._sweep_forever())
            return self._service

    def _shared_chain(self) -> ChainBackend | None:
        """Several workers on litesvm share the chain actor's one LiteSVM; otherwise the service builds its own."""
        if self.section.workers == 1 or self.section.chain_backend != "litesvm":
            return None
        import ray

        from payments.chain.shared import SharedLiteSVMBackend, start_chain_actor

        namespace = self.namespace or ray.get_runtime_context().namespace
        path = self.section.state_dir / "litesvm.json"
        return SharedLiteSVMBackend(start_chain_actor(self.section.chain_actor_name, path, namespace))

    async def worker_info(self) -> dict[str, object]:
        """Which worker this is, and who holds the settlement lease (for tests and `status`)."""
        service = await self._svc()
        lease = service.lease.state()
        return {"worker": self.worker, "holder": service.lease.holder, "lease_holder": lease and lease.holder}

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def _settle_forever(self) -> None:
        while True:
            await asyncio.sleep(self.section.settle_interval_s)
            try:
                await self.settle()
            except Exception:  # keep the loop alive; the next pass retries from the ledger state
                logger.exception("settle pass failed")

    async def _sweep_forever(self) -> None:
        """Release orphaned holds (older than payments.hold_max_age_s) every hold_sweep_interval_s."""
        while True:
            await asyncio.sleep(self.section.hold_sweep_interval_s)
            try:
                await self._run((await self._svc()).sweep_holds)
            except Exception:  # keep the loop alive; the next pass finds the same holds
                logger.exception("hold sweep failed")

    async def ready(self) -> bool:
        await self._svc()
        return True

    async def report_usage(self, report: UsageReport) -> SettlementRecord:
        await self._svc()
        if self._committer is None:
            raise RuntimeError("payments service not initialised")
        return await self._committer.submit(report)

    async def record_training_rewards(self, rewards: list[dict[str, Any]]) -> list[str]:
        """train_jobs' reward sink: plain RoundReward dicts (job, round, wallet, amount_lamports,
        examples, dropped); returns the reward record ids. Recording a round twice is a no-op; a batch
        beyond the rewards account is refused whole (InsufficientBalance `rewards_unfunded`)."""
        parsed = [
            TrainingReward(
                str(r["job"]),
                int(r["round"]),
                str(r["wallet"]),
                int(r["amount_lamports"]),
                int(r.get("examples", 0)),
            )
            for r in rewards
            if not r.get("dropped", False)
        ]
        records = await self._run((await self._svc()).record_training_rewards, parsed)
        return [record.settlement_id for record in records]

    async def settle(self) -> BatchReport:
        service = await self._svc()
        async with self._settle_lock:  # one settle pass at a time (loop and CLI)
            return await service.settle()

    async def reconcile(self) -> ReconcileReport:
        service = await self._svc()
        async with self._settle_lock:
            return await service.reconcile()
