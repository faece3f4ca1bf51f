"""The stage actors of one replica, placed one per bundle of the replica's placement group."""

import asyncio
import contextlib
import logging
from pathlib import Path

import ray
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config.serving import PipelineSection
from serve_apps.engine.executor import RayPipelineExecutor
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import StageInfo
from serve_apps.engine.stage_actor import StageActor, stage_actor_options, torch_threads_for
from serve_apps.engine.stage_worker import StageConfig

logger = logging.getLogger(__name__)


class StagePool:
    """Creates, describes, health-checks and tears down the stage actors of one pipeline."""

    def __init__(self, actors: list, names: list[str], timeout_s: float) -> None:
        self.actors = actors
        self.names = names
        self.timeout_s = timeout_s

    @classmethod
    def create(
        cls,
        model: str,
        model_dir: Path,
        dtype: str,
        specs: tuple[StageSpec, ...],
        max_len: int,
        pipeline: PipelineSection,
    ) -> "StagePool":
        """Start one actor per stage in bundle i of the current placement group (if any); wait until loaded."""
        placement_group = get_current_placement_group()
        prefix = f"stage:{model}:{ray.get_runtime_context().get_actor_id() or 'driver'}"
        actors, names = [], []
        for spec in specs:
            name = f"{prefix}:{spec.index}:{spec.start}-{spec.end}"
            config = StageConfig(
                model_dir=str(model_dir),
                spec=spec,
                dtype=dtype,
                kv_slots=pipeline.max_num_seqs,
                max_len=max_len,
                torch_threads=torch_threads_for(pipeline.stage_resources),
                actor_name=name,
            )
            options = stage_actor_options(pipeline.stage_resources)
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group,
                    placement_group_bundle_index=spec.index,
                    placement_group_capture_child_tasks=False,
                )
            actors.append(StageActor.options(name=name, **options).remote(config))  # type: ignore[attr-defined]
            names.append(name)
        pool = cls(actors, names, pipeline.stage_call_timeout_s)
        pool.wait_ready(max(pipeline.stage_call_timeout_s, 300.0))
        logger.info("stages ready: %s", ", ".join(names))
        return pool

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every stage has loaded its layers; name the ones that did not."""
        refs = {actor.ping.remote(): name for actor, name in zip(self.actors, self.names, strict=True)}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        ray.get(ready)  # surfaces a stage that failed to load
        if pending:
            self.kill()
            raise TimeoutError(f"stages not ready after {timeout_s:.0f} s: {', '.join(refs[r] for r in pending)}")

    def executor(self) -> RayPipelineExecutor:
        return RayPipelineExecutor(self.actors, self.timeout_s)

    async def describe(self) -> list[StageInfo]:
        return list(await asyncio.wait_for(asyncio.gather(*[a.describe.remote() for a in self.actors]), self.timeout_s))

    async def ping(self) -> None:
        await asyncio.wait_for(asyncio.gather(*[a.ping.remote() for a in self.actors]), self.timeout_s)

    def kill(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):  # best effort on teardown
                ray.kill(actor, no_restart=True)
