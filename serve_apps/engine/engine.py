"""The async engine loop of one replica: scheduler decides, executor computes, tokens flow to requests."""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve_apps.engine.executor import PipelineRecovery, StageCallError, StepExecutor
from serve_apps.engine.scheduler import Scheduler, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    finish_reason: str | None


class EngineError(RuntimeError):
    """Generation of a sequence failed inside the pipeline."""


class Engine:
    """Runs steps back to back while there is work; each request reads its tokens from its own queue."""

    def __init__(
        self,
        scheduler: Scheduler,
        executor: StepExecutor,
        recovery: PipelineRecovery | None = None,
        max_recovery_attempts: int = 3,
    ) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.recovery = recovery
        self.max_recovery_attempts = max_recovery_attempts
        self.recoveries = 0
        self.healthy = True  # False once a recovery gave up; Serve's health check then replaces the replica
        self._queues: dict[str, asyncio.Queue[TokenEvent | Exception]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    async def stream(self, seq: Sequence) -> AsyncIterator[TokenEvent]:
        """Queue `seq` (QueueFullError if the queue is full) and yield its tokens as they are sampled.

        Leaving the iterator early (client gone, stop string, cancellation) frees the sequence's slot.
        """
        self._ensure_running()
        queue: asyncio.Queue[TokenEvent | Exception] = asyncio.Queue()
        self.scheduler.add(seq)
        self._queues[seq.seq_id] = queue
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                event = await queue.get()
                if isinstance(event, Exception):
                    finished = True
                    raise event
                finished = event.finish_reason is not None
                yield event
        finally:
            self._queues.pop(seq.seq_id, None)
            if not finished:
                self.abort(seq.seq_id, "abort")

    def abort(self, seq_id: str, reason: str) -> None:
        """Finish a sequence now; its slot is released with the next step."""
        self.scheduler.finish(seq_id, reason)
        self._wakeup.set()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def _run(self) -> None:
        while True:
            batch = self.scheduler.schedule()
            if batch is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                result = await self.executor.execute(batch)
            except StageCallError as exc:
                if not await self._recover(exc):
                    self._fail_step(batch.step_id, exc)
                continue
            self.steps += 1
            for update in self.scheduler.update(result):
                queue = self._queues.get(update.seq_id)
                if queue is not None:
                    queue.put_nowait(TokenEvent(update.token_id, update.finish_reason))

    async def _recover(self, exc: StageCallError) -> bool:
        """Bring dead stages back and replay every live sequence; False when the pipeline stays broken."""
        if self.recovery is None:
            return False
        for attempt in range(1, self.max_recovery_attempts + 1):
            logger.warning("step failed (%s); recovering the pipeline, attempt %d", exc, attempt)
            try:
                if await self.recovery.recover():
                    self.recoveries += 1
                    self.healthy = True
                    replayed = self.scheduler.replay_all()
                    logger.warning("pipeline recovered; replaying %d sequences", replayed)
                    return True
            except Exception:  # noqa: BLE001 - any failure here is retried, then reported to requests
                logger.exception("pipeline recovery attempt %d failed", attempt)
            await asyncio.sleep(min(2.0, 0.25 * 2**attempt))
        self.healthy = False
        return False

    def _fail_step(self, step_id: int, exc: Exception) -> None:
        logger.error("pipeline step %d failed: %s", step_id, exc)
        for seq in self.scheduler.fail(step_id):
            self.scheduler.finish(seq.seq_id, "error")
            queue = self._queues.get(seq.seq_id)
            if queue is not None:
                queue.put_nowait(EngineError(f"pipeline failure: {exc}"))
