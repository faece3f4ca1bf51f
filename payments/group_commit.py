"""Group commit: concurrent settlement reports share one durable database transaction."""

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from payments.errors import PaymentError
from payments.protocol import SettlementRecord, UsageReport

logger = logging.getLogger(__name__)
CommitFn = Callable[[list[UsageReport]], list[SettlementRecord | PaymentError]]


class GroupCommitter:
    """Queue reports while a commit is running; the next commit takes up to `max_batch` of them.

    Each caller's await returns only after the transaction holding its record has committed, so the
    record is durable before the response completes, at a fraction of one commit per request.
    """

    def __init__(self, commit: CommitFn, max_batch: int, executor: Executor) -> None:
        self._commit = commit
        self._max_batch = max_batch
        self._executor = executor
        self._queue: list[tuple[UsageReport, asyncio.Future[SettlementRecord]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0

    async def submit(self, report: UsageReport) -> SettlementRecord:
        future: asyncio.Future[SettlementRecord] = asyncio.get_running_loop().create_future()
        self._queue.append((report, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            try:
                results = await loop.run_in_executor(self._executor, self._commit, [r for r, _ in batch])
            except Exception as exc:  # the whole transaction rolled back: every caller sees the error
                logger.exception("group commit of %d records failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.commits += 1
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, PaymentError):
                    future.set_exception(result)
                else:
                    future.set_result(result)
