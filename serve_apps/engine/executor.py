"""Fans a step out to the stage actors: hidden states go stage to stage as ObjectRefs, not via the replica."""

import asyncio
from typing import Protocol

from serve_apps.engine.messages import StepBatch, StepResult


class StepExecutor(Protocol):
    """What the engine needs from whatever computes a step (a Ray pipeline, or a fake in tests)."""

    async def execute(self, batch: StepBatch) -> StepResult: ...


class PipelineRecovery(Protocol):
    """Brings a pipeline whose stage died back to full strength (recreating stages as needed)."""

    async def recover(self) -> bool: ...


class StageCallError(RuntimeError):
    """A stage call failed or timed out; the engine decides whether to retry."""


class RayPipelineExecutor:
    """Chains `forward.remote` through the stage actors; only the last stage's small result comes back."""

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
