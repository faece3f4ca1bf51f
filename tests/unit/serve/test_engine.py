"""The engine loop with a fake executor: streaming, cancellation, failures. No model, no Ray."""

import asyncio

import pytest

from serve_apps.engine.engine import Engine, EngineError
from serve_apps.engine.executor import StageCallError
from serve_apps.engine.messages import SamplingParams, StepBatch, StepResult
from serve_apps.engine.scheduler import QueueFullError, Scheduler, SchedulerLimits, Sequence


class CountingExecutor:
    """Each sampled token is the previous token + 1; can be told to fail or to be slow."""

    def __init__(self, fail_on_step: int | None = None, delay_s: float = 0.0) -> None:
        self.fail_on_step, self.delay_s = fail_on_step, delay_s
        self.batches: list[StepBatch] = []

    async def execute(self, batch: StepBatch) -> StepResult:
        self.batches.append(batch)
        await asyncio.sleep(self.delay_s)
        if batch.step_id == self.fail_on_step:
            raise StageCallError("stage died")
        return StepResult(batch.step_id, tuple(c.token_ids[-1] + 1 if c.sample else -1 for c in batch.chunks))


def engine(executor: CountingExecutor, slots: int = 4, queue: int = 8) -> Engine:
    return Engine(Scheduler(SchedulerLimits(slots, 8, queue), eos_token_ids=(999,)), executor)


def sequence(seq_id: str, prompt: list[int], max_tokens: int) -> Sequence:
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), 256)


async def collect(e: Engine, seq: Sequence) -> list[int]:
    return [event.token_id async for event in e.stream(seq)]


def test_concurrent_requests_each_get_their_own_tokens() -> None:
    async def main() -> list[list[int]]:
        e = engine(CountingExecutor())
        return await asyncio.gather(collect(e, sequence("a", [1, 2], 3)), collect(e, sequence("b", [50], 4)))

    assert asyncio.run(main()) == [[3, 4, 5], [51, 52, 53, 54]]


def test_leaving_the_stream_early_frees_the_slot() -> None:
    async def main() -> tuple[int, list[int]]:
        e = engine(CountingExecutor(delay_s=0.001), slots=1)
        stream = e.stream(sequence("a", [1], 100))
        await anext(stream)
        await stream.aclose()  # what a client disconnect does
        # The single slot is free again: a second request runs to completion.
        return len(e.scheduler.running), await collect(e, sequence("b", [10], 2))

    running, tokens = asyncio.run(main())
    assert running == 0 and tokens == [11, 12]


def test_stage_failure_reaches_the_request_as_engine_error() -> None:
    async def main() -> None:
        e = engine(CountingExecutor(fail_on_step=0))
        await collect(e, sequence("a", [1], 3))

    with pytest.raises(EngineError, match="stage died"):
        asyncio.run(main())


def test_queue_bound_raises_queue_full() -> None:
    async def main() -> None:
        e = engine(CountingExecutor(delay_s=0.01), slots=1, queue=0)
        first = e.stream(sequence("a", [1], 50))
        await anext(first)
        await collect(e, sequence("b", [1], 1))

    with pytest.raises(QueueFullError):
        asyncio.run(main())


class FlakyExecutor(CountingExecutor):
    """Fails the given steps once (a stage died), then works; counts recoveries asked of it."""

    def __init__(self, fail_steps: set[int]) -> None:
        super().__init__()
        self.fail_steps, self.recovered = set(fail_steps), 0

    async def execute(self, batch: StepBatch) -> StepResult:
        self.batches.append(batch)
        if batch.step_id in self.fail_steps:
            self.fail_steps.discard(batch.step_id)
            raise StageCallError("stage died")
        return StepResult(batch.step_id, tuple(c.token_ids[-1] + 1 if c.sample else -1 for c in batch.chunks))

    async def recover(self) -> bool:
        self.recovered += 1
        return True


def test_stage_failure_is_recovered_and_output_is_unchanged() -> None:
    async def main(fail_steps: set[int]) -> tuple[list[list[int]], int]:
        executor = FlakyExecutor(fail_steps)
        e = Engine(Scheduler(SchedulerLimits(4, 8, 8), eos_token_ids=(999,)), executor, recovery=executor)
        outs = await asyncio.gather(collect(e, sequence("a", [1, 2], 6)), collect(e, sequence("b", [50], 6)))
        return list(outs), executor.recovered

    baseline, _ = asyncio.run(main(set()))
    faulted, recovered = asyncio.run(main({3, 6, 7}))
    assert faulted == baseline and recovered == 3


def test_unrecoverable_pipeline_fails_requests_clearly() -> None:
    class Hopeless(FlakyExecutor):
        async def recover(self) -> bool:
            return False

    async def main() -> None:
        executor = Hopeless({0})
        e = Engine(Scheduler(SchedulerLimits(4, 8, 8), (999,)), executor, recovery=executor, max_recovery_attempts=1)
        await collect(e, sequence("a", [1], 3))

    with pytest.raises(EngineError):
        asyncio.run(main())


class PipelinedExecutor(CountingExecutor):
    """A pipeline of `stages` stages: each processes one step at a time, in submission order, taking `stage_s`."""

    def __init__(self, stages: int, stage_s: float, fail_steps: set[int] | None = None) -> None:
        super().__init__()
        self.locks = [asyncio.Lock() for _ in range(stages)]
        self.stage_s = stage_s
        self.fail_steps = set(fail_steps or ())
        self.recovered = 0

    async def execute(self, batch: StepBatch) -> StepResult:
        self.batches.append(batch)
        for lock in self.locks:
            async with lock:
                await asyncio.sleep(self.stage_s)
        if batch.step_id in self.fail_steps:
            self.fail_steps.discard(batch.step_id)
            raise StageCallError("stage died")
        return StepResult(batch.step_id, tuple(c.token_ids[-1] + 1 if c.sample else -1 for c in batch.chunks))

    async def recover(self) -> bool:
        self.recovered += 1
        return True


def pipelined(executor: PipelinedExecutor, inflight: int) -> Engine:
    limits = SchedulerLimits(8, 8, 8, num_microbatches=inflight)
    return Engine(Scheduler(limits, (999,)), executor, recovery=executor, max_inflight_steps=inflight)


def test_pipelining_keeps_stages_busy_and_output_unchanged() -> None:
    async def main(inflight: int, fail_steps: set[int]) -> tuple[list[list[int]], Engine, float]:
        executor = PipelinedExecutor(stages=3, stage_s=0.002, fail_steps=fail_steps)
        e = pipelined(executor, inflight)
        loop = asyncio.get_running_loop()
        start = loop.time()
        outs = await asyncio.gather(*(collect(e, sequence(f"s{i}", [i * 10], 12)) for i in range(6)))
        return list(outs), e, loop.time() - start

    serial, serial_engine, _ = asyncio.run(main(1, set()))
    piped, piped_engine, _ = asyncio.run(main(3, set()))
    assert piped == serial == [[i * 10 + k for k in range(1, 13)] for i in range(6)]
    assert serial_engine.max_inflight_seen == 1 and piped_engine.max_inflight_seen == 3
    # Decodes are split into three micro-batches of two rows: the three stages compute at once.
    batches = piped_engine.executor.batches  # type: ignore[attr-defined]
    decode_rows = [sum(1 for c in b.chunks if c.start_pos > 0) for b in batches]
    assert max(decode_rows) == 2
    faulted, faulted_engine, _ = asyncio.run(main(3, {5, 9, 10, 20}))
    assert faulted == serial and faulted_engine.recoveries >= 3


def test_fallback_transport_switches_to_actor_calls_after_the_first_failure() -> None:
    from serve_apps.engine.executor import FallbackExecutor

    class Fast(CountingExecutor):
        closed = False

        def close(self) -> None:
            self.closed = True

    fast, robust = Fast(fail_on_step=1), CountingExecutor()
    executor = FallbackExecutor(fast, robust)  # type: ignore[arg-type]
    batch = StepBatch(0, ())

    async def main() -> None:
        await executor.execute(batch)
        assert executor.transport == "compiled_graph"
        with pytest.raises(StageCallError):
            await executor.execute(StepBatch(1, ()))
        await executor.execute(StepBatch(2, ()))

    asyncio.run(main())
    assert fast.closed and executor.transport == "actor_calls"
    assert [b.step_id for b in fast.batches] == [0, 1] and [b.step_id for b in robust.batches] == [2]


def test_the_next_step_is_submitted_before_the_reader_sees_the_token() -> None:
    """A single stream's stages compute its next token while its reader detokenizes and streams this one."""

    async def main() -> list[tuple[int, int]]:
        executor = CountingExecutor()
        e = engine(executor)
        seen = []  # (token, steps the executor had been given when the reader got it)
        async for event in e.stream(sequence("a", [1], 4)):
            seen.append((event.token_id, len(executor.batches)))
        return seen

    # Token k + 1 (from step k - 1) reaches the reader once step k is out (after the last: the step releasing its slot).
    assert asyncio.run(main()) == [(2, 2), (3, 3), (4, 4), (5, 5)]
