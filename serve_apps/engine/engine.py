"""The async engine loop of one replica: scheduler decides, executor computes, tokens flow to requests."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve_apps.engine.executor import PipelineRecovery, StageCallError, StepExecutor
from serve_apps.engine.messages import StepBatch, TokenLogprobs
from serve_apps.engine.scheduler import Scheduler, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None
    embedding: tuple[float, ...] | None = None  # an embedding sequence's pooled result (token_id -1)


class EngineError(RuntimeError):
    """Generation of a sequence failed inside the pipeline."""


class Engine:
    """Keeps up to `max_inflight_steps` steps in flight; each request reads its tokens from its own queue.

    With one step in flight the stages of a pipeline take turns; with one per stage (pipelining) stage 0
    computes micro-batch k+1 while stage 1 computes micro-batch k. Steps are submitted in order and stage
    actors run their calls in submission order, so every stage sees a sequence's chunks in order.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        executor: StepExecutor,
        recovery: PipelineRecovery | None = None,
        max_recovery_attempts: int = 1000,
        max_inflight_steps: int = 1,
        recovery_timeout_s: float = 300.0,
    ) -> None:
        if max_inflight_steps < 1:
            raise ValueError("max_inflight_steps must be at least 1")
        self.scheduler = scheduler
        self.executor = executor
        self.recovery = recovery
        self.max_recovery_attempts = max_recovery_attempts
        self.recovery_timeout_s = recovery_timeout_s  # keep recreating stages this long (they may die again)
        self.max_inflight_steps = max_inflight_steps
        self.recoveries = 0
        self.healthy = True  # False once a recovery gave up; Serve's health check then replaces the replica
        self._queues: dict[str, asyncio.Queue[TokenEvent | Exception]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._stale: set[asyncio.Task[None]] = set()  # steps of a pipeline that has since been recovered
        self._epoch = 0  # bumped by every failure: results of older steps are dropped (they are replayed)
        self._recovering = False
        self.steps = 0
        self.max_inflight_seen = 0  # most steps that were in flight at once (pipelining at work)

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

    def ready(self, seq_id: str) -> int:
        """Tokens of `seq_id` already sampled and waiting in its stream (the reader is behind)."""
        queue = self._queues.get(seq_id)
        return queue.qsize() if queue is not None else 0

    def abort(self, seq_id: str, reason: str) -> None:
        """Finish a sequence now; its slot is released with the next step."""
        self.scheduler.finish(seq_id, reason)
        self._wakeup.set()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            if not self._recovering:
                self._launch_steps()
            await self._wakeup.wait()

    def _launch_steps(self) -> None:
        """Submit steps until `max_inflight_steps` are in flight or the scheduler has nothing to run."""
        loop = asyncio.get_running_loop()
        while len(self._inflight) < self.max_inflight_steps:
            batch = self.scheduler.schedule()
            if batch is None:
                return
            task = loop.create_task(self._step(batch, self._epoch), name=f"step-{batch.step_id}")
            self._inflight[batch.step_id] = task

    async def _step(self, batch: StepBatch, epoch: int) -> None:
        self.max_inflight_seen = max(self.max_inflight_seen, len(self._inflight))
        try:
            result = await self.executor.execute(batch)
        except StageCallError as exc:
            if epoch == self._epoch:
                await self._on_failure(batch, exc)
            return
        finally:
            self._inflight.pop(batch.step_id, None)
            self._wakeup.set()
        if epoch != self._epoch:
            return  # computed by the pipeline before its recovery: the replay recomputes it
        self.steps += 1
        updates = self.scheduler.update(result)
        if not self._recovering:
            # The next step goes out before any reader handles these tokens: a single stream's stages then
            # compute while its replica detokenizes and streams, instead of after (one loop turn less per token).
            self._launch_steps()
        for update in updates:
            queue = self._queues.get(update.seq_id)
            if queue is not None:
                queue.put_nowait(TokenEvent(update.token_id, update.finish_reason, update.logprobs, update.embedding))

    async def _on_failure(self, batch: StepBatch, exc: StageCallError) -> None:
        """A step failed: every step in flight is void; recover the pipeline and replay, or fail everyone."""
        self._epoch += 1
        self._stale.update(self._inflight.values())
        for task in self._inflight.values():
            task.add_done_callback(self._stale.discard)
        self._inflight.clear()
        self._recovering = True
        try:
            recovered = await self._recover(exc)
        finally:
            self._recovering = False
            self._wakeup.set()
        if not recovered:
            self._fail_all(exc)

    async def _recover(self, exc: StageCallError) -> bool:
        """Bring dead stages back and replay every live sequence; False when the pipeline stays broken."""
        if self.recovery is None:
            return False
        deadline = time.monotonic() + self.recovery_timeout_s
        for attempt in range(1, self.max_recovery_attempts + 1):
            if attempt > 1 and time.monotonic() >= deadline:
                break
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

    def _fail_all(self, exc: Exception) -> None:
        """The pipeline is broken: every resident sequence ends with an error its request sees."""
        logger.error("pipeline failed: %s", exc)
        self.scheduler.replay_all()  # forget in-flight steps; nothing of them will be applied
        for seq_id in list(self.scheduler.running):
            self.scheduler.finish(seq_id, "error")
            queue = self._queues.get(seq_id)
            if queue is not None:
                queue.put_nowait(EngineError(f"pipeline failure: {exc}"))
