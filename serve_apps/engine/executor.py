"""Fans a step out to the stage actors through Ray: chained actor calls or a compiled graph.

`RayPipelineExecutor` chains plain actor calls (ObjectRefs: each hop returns to the replica, which owns
the intermediate result, before the next stage gets it; ~2 ms per hop here); `CompiledGraphExecutor` runs
the same chain as a Ray compiled graph (shared-memory channels between stage processes, under 1 ms per
hop, but its readers poll). The default transport, direct TCP links from stage to stage, is
`serve_apps.engine.links.DirectExecutor`. All submit steps in call order, which is what pipelining needs.
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable
from typing import Any, Protocol

from serve_apps.engine.messages import StepBatch, StepResult


class StepExecutor(Protocol):
    """What the engine needs from whatever computes a step (a Ray pipeline, or a fake in tests)."""

    async def execute(self, batch: StepBatch) -> StepResult: ...


class PipelineRecovery(Protocol):
    """Brings a pipeline whose stage died back to full strength (recreating stages as needed)."""

    async def recover(self) -> bool: ...


class StageCallError(RuntimeError):
    """A stage call failed or timed out; the engine decides whether to retry."""


logger = logging.getLogger(__name__)


class RayPipelineExecutor:
    """Chains `forward.remote` through the stage actors; only the last stage's small result comes back."""

    transport = "actor_calls"

    def __init__(self, stages: list, timeout_s: float) -> None:  # list[ray.actor.ActorHandle]
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = stages
        self.timeout_s = timeout_s

    async def execute(self, batch: StepBatch) -> StepResult:
        import ray

        ref = self.stages[0].forward.remote(batch, None)
        for stage in self.stages[1:]:
            ref = stage.forward.remote(batch, ref)
        try:
            result = await asyncio.wait_for(ref, timeout=self.timeout_s)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            raise StageCallError(f"step {batch.step_id} failed: {exc}") from exc
        if not isinstance(result, StepResult):
            raise StageCallError(f"last stage returned {type(result).__name__}, expected StepResult")
        return result

    def close(self) -> None:
        """Nothing to tear down: each step's calls are independent."""


class CompiledGraphExecutor:
    """The stage chain compiled once into a Ray compiled graph; recompiled when a stage was recreated.

    Stage actors run graph steps on a background thread, so their other methods (ping, describe) still
    answer. Up to `max_inflight` steps may be in flight (the engine's pipelining depth).
    """

    transport = "compiled_graph"

    def __init__(  # stages: list[ActorHandle]
        self, stages: list, timeout_s: float, max_inflight: int, probe_s: float = 1.0
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = stages  # shared with the stage pool: a recreated stage shows up here
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.probe_s = probe_s
        self.compilations = 0
        self._dag: Any = None
        self._compiled_for: list[Any] = []

    async def execute(self, batch: StepBatch) -> StepResult:
        try:
            dag = self._graph()
            future = await dag.execute_async(batch)
            result = await await_or_probe(_awaited(future), self.stages, self.timeout_s, self.probe_s, batch.step_id)
        except Exception as exc:  # noqa: BLE001 - Ray raises channel, actor and (on teardown) even TypeErrors
            self.close()
            raise StageCallError(f"step {batch.step_id} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, StepResult):
            raise StageCallError(f"last stage returned {type(result).__name__}, expected StepResult")
        return result

    def _graph(self) -> Any:
        actor_ids = [stage._actor_id for stage in self.stages]
        if self._dag is None or actor_ids != self._compiled_for:
            self.close()
            self._dag = compile_stage_graph(self.stages, self.max_inflight)
            self._compiled_for = actor_ids
            self.compilations += 1
            logger.info("compiled the stage graph (%d stages, compilation %d)", len(self.stages), self.compilations)
        return self._dag

    def close(self) -> None:
        """Tear the graph down (idempotent, in the background); the next step compiles a new one."""
        dag, self._dag = self._dag, None
        if dag is not None:
            # Teardown waits on the stages' graph loops; with a dead stage that can take long, so it must
            # not block the replica's event loop.
            threading.Thread(target=_teardown, args=(dag,), daemon=True, name="cgraph-teardown").start()


class FallbackExecutor:
    """A compiled graph until its first failure, plain actor calls from then on (`transport: auto`).

    Ray 2.55's compiled graphs do not always survive a stage's death (a recompiled graph can hang
    when the surviving stages' old graph loops have not exited), so after one failure the replica
    keeps the slower transport that recovers reliably. The failing step is reported as usual and the
    engine's recovery replays it.
    """

    def __init__(self, fast: "CompiledGraphExecutor", robust: RayPipelineExecutor) -> None:
        self.fast: CompiledGraphExecutor | None = fast
        self.robust = robust

    @property
    def transport(self) -> str:
        return "compiled_graph" if self.fast is not None else "actor_calls"

    async def execute(self, batch: StepBatch) -> StepResult:
        fast = self.fast
        if fast is None:
            return await self.robust.execute(batch)
        try:
            return await fast.execute(batch)
        except StageCallError:
            if self.fast is not None:
                logger.warning("compiled graph failed; this pipeline uses actor calls from now on")
                self.fast = None
                fast.close()
            raise

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()


async def await_or_probe(step: Awaitable[Any], stages: list, timeout_s: float, probe_s: float, step_id: int) -> Any:
    """The step's result; a stage found dead while waiting fails the step now, not at the timeout.

    A transport does not always notice that a stage's process died (a reader may just wait), so a step
    that takes longer than `probe_s` pings the stages (answered on their main thread).
    """
    waiting = asyncio.ensure_future(step)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=min(probe_s, max(0.0, deadline - loop.time())))
        if done:
            return waiting.result()
        dead = await _dead_stages(stages, probe_s)
        if dead or loop.time() >= deadline:
            waiting.cancel()
            reason = f"stages {dead} died" if dead else f"no result after {timeout_s:.0f} s"
            raise StageCallError(f"step {step_id}: {reason}")


async def _dead_stages(stages: list, probe_s: float) -> list[int]:
    import ray

    async def dead(stage: Any) -> bool:
        try:
            await asyncio.wait_for(stage.ping.remote(), timeout=probe_s * 5)
        except ray.exceptions.RayActorError:
            return True
        except (TimeoutError, ray.exceptions.RayError):
            return False  # slow to answer is not dead
        return False

    flags = await asyncio.gather(*(dead(stage) for stage in stages))
    return [index for index, flag in enumerate(flags) if flag]


def _teardown(dag: Any) -> None:
    with contextlib.suppress(Exception):  # a graph with a dead stage may fail to tear down cleanly
        dag.teardown()


async def _awaited(future: Any) -> Any:
    return await future


def compile_stage_graph(stages: list, max_inflight: int) -> Any:
    """stage_0.forward(batch) -> stage_1.forward(batch, hidden) -> ... as an asyncio compiled graph."""
    from ray.dag import InputNode

    with InputNode() as batch:
        node = stages[0].forward.bind(batch, None)
        for stage in stages[1:]:
            node = stage.forward.bind(batch, node)
    return node.experimental_compile(enable_asyncio=True, _max_inflight_executions=max_inflight)
