"""The stage actors of one replica, placed one per bundle of the replica's placement group.

The pool keeps each stage's recipe (config + actor options), so a stage whose process died is
recreated in the same bundle; the engine then replays every live sequence to rebuild the caches.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config.serving import PipelineSection, WeightQuant
from serve_apps.engine.device import max_step_tokens
from serve_apps.engine.executor import CompiledGraphExecutor, FallbackExecutor, RayPipelineExecutor
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.links import DirectExecutor
from serve_apps.engine.messages import StageInfo
from serve_apps.engine.stage_actor import StageActor, stage_actor_options, torch_threads_for
from serve_apps.engine.stage_worker import StageConfig
from serve_apps.stagehost.wire import FrameLimits

logger = logging.getLogger(__name__)
PoolExecutor = RayPipelineExecutor | CompiledGraphExecutor | FallbackExecutor | DirectExecutor

NAME_RETRIES = 20
LOAD_ATTEMPTS = 5  # a dead actor's name is released shortly after its death is known
LOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class StageRecipe:
    """How to (re)create one stage actor: its config and its Ray options (bundle included)."""

    name: str
    config: StageConfig
    options: dict[str, Any]

    def start(self) -> Any:
        return StageActor.options(name=self.name, **self.options).remote(self.config)  # type: ignore[attr-defined]


class StagePool:
    """Creates, describes, health-checks, recreates and tears down the stage actors of one pipeline."""

    def __init__(
        self, recipes: list[StageRecipe], timeout_s: float, transport: str = "actor_calls", max_inflight: int = 1
    ) -> None:
        self.recipes = recipes
        self.timeout_s = timeout_s
        self.transport = transport
        self.max_inflight = max_inflight
        self._executor: PoolExecutor | None = None
        self.actors: list[Any] = [recipe.start() for recipe in recipes]
        self.restarts = 0
        self.frame_limits: FrameLimits | None = None  # the direct transport's message limits
        self._recovering = asyncio.Lock()

    @property
    def names(self) -> list[str]:
        return [recipe.name for recipe in self.recipes]

    @classmethod
    def create(
        cls,
        model: str,
        model_dir: Path,
        dtype: str,
        specs: tuple[StageSpec, ...],
        max_len: int,
        pipeline: PipelineSection,
        kv_slots: int | None = None,
        weight_quant: WeightQuant = "none",
    ) -> "StagePool":
        """Start one actor per stage in bundle i of the current placement group (if any); wait until loaded."""
        placement_group = get_current_placement_group()
        prefix = stage_name_prefix(model)
        recipes = [
            stage_recipe(prefix, spec, model_dir, dtype, max_len, pipeline, kv_slots, weight_quant) for spec in specs
        ]
        for spec, recipe in zip(specs, recipes, strict=True):
            in_bundle(recipe, placement_group, spec.index)
        pool = cls(recipes, pipeline.stage_call_timeout_s, pipeline.transport)
        # What the replica's end of the direct links accepts from the last stage (and sends to the first).
        pool.frame_limits = FrameLimits.for_model(
            model_dir, kv_slots or pipeline.max_num_seqs, max_len, pipeline.max_batch_size, pipeline.prefill_chunk
        )
        pool.wait_ready(max(pipeline.stage_call_timeout_s, LOAD_TIMEOUT_S))
        # The pipelining depth, for the engine and a compiled graph's buffers alike.
        pool.max_inflight = pipeline.max_inflight_steps or pool.concurrent_stages()
        logger.info("stages ready: %s", ", ".join(pool.names))
        return pool

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every stage has loaded its layers; a stage that died while loading is started again
        (up to LOAD_ATTEMPTS times: a provider process may be killed at any moment); name the ones that hang."""
        deadline = time.monotonic() + timeout_s
        for _attempt in range(LOAD_ATTEMPTS):
            refs = {actor.ping.remote(): index for index, actor in enumerate(self.actors)}
            ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=max(1.0, deadline - time.monotonic()))
            if pending:
                self.kill()
                names = ", ".join(self.names[refs[ref]] for ref in pending)
                raise TimeoutError(f"stages not ready after {timeout_s:.0f} s: {names}")
            dead = [refs[ref] for ref in ready if not _answered(ref)]
            if not dead:
                return
            for index in dead:
                logger.warning("stage %s died while loading; starting it again", self.names[index])
                self.actors[index] = self._start_blocking(self.recipes[index])
        self.kill()
        raise RuntimeError(f"stages kept dying while loading ({LOAD_ATTEMPTS} attempts)")

    def _start_blocking(self, recipe: StageRecipe) -> Any:
        for _ in range(NAME_RETRIES):
            try:
                return recipe.start()
            except ValueError:  # name still held by the dead actor
                time.sleep(0.5)
        raise RuntimeError(f"could not recreate stage {recipe.name}: its name stays taken")

    def node_ids(self) -> list[str]:
        """The Ray node each stage runs on (blocking; used once at start-up)."""
        return [info.node_id for info in self._describe_blocking()]

    def concurrent_stages(self) -> int:
        """How many stages can compute at once (blocking; used once at start-up): see `concurrent_stages`."""
        return concurrent_stages(self._describe_blocking())

    def kv_slots(self) -> int:
        """The fewest KV slots a stage holds (blocking; at start-up): a GPU stage sizes its own to its memory."""
        return min(info.kv_slots for info in self._describe_blocking())

    def _describe_blocking(self) -> list[StageInfo]:
        return list(ray.get([actor.describe.remote() for actor in self.actors], timeout=self.timeout_s))

    def executor(self) -> PoolExecutor:
        """The pipeline's step executor; it shares `self.actors`, so a recreated stage is used from the next step."""
        if self._executor is None:
            compiled = CompiledGraphExecutor(self.actors, self.timeout_s, self.max_inflight)
            plain = RayPipelineExecutor(self.actors, self.timeout_s)
            if self.transport == "direct":
                self._executor = DirectExecutor(self.actors, self.timeout_s, limits=self.frame_limits)
            elif self.transport == "compiled_graph":
                self._executor = compiled
            elif self.transport == "auto" and len(set(self.node_ids())) == 1:
                # Across nodes a compiled graph pushes through Ray's mutable objects, and a provider node
                # leaving has crashed the other nodes' raylets: only single-node pipelines use it.
                self._executor = FallbackExecutor(compiled, plain)
            else:
                self._executor = plain
        return self._executor

    async def recover(self) -> bool:
        """Recreate every stage that does not answer a ping, each in its own bundle; True when all answer."""
        async with self._recovering:
            return await self._recover_dead()

    async def _recover_dead(self) -> bool:
        dead = [i for i, alive in enumerate(await asyncio.gather(*map(self._alive, self.actors))) if not alive]
        for index in dead:
            logger.warning("stage %s is dead; recreating it in bundle %d", self.names[index], index)
            with contextlib.suppress(Exception):
                ray.kill(self.actors[index], no_restart=True)
            self.actors[index] = await self._restart(self.recipes[index])
            self.restarts += 1
        return all(await asyncio.gather(*map(self._alive, self.actors)))

    async def _restart(self, recipe: StageRecipe) -> Any:
        for _ in range(NAME_RETRIES):
            try:
                actor = recipe.start()
                break
            except ValueError:  # name still held by the dead actor
                await asyncio.sleep(0.5)
        else:
            raise RuntimeError(f"could not recreate stage {recipe.name}: its name stays taken")
        await asyncio.wait_for(actor.ping.remote(), LOAD_TIMEOUT_S)
        return actor

    async def _alive(self, actor: Any) -> bool:
        try:
            return bool(await asyncio.wait_for(actor.ping.remote(), self.timeout_s))
        except (ray.exceptions.RayError, TimeoutError):
            return False

    async def describe(self) -> list[StageInfo]:
        calls = asyncio.gather(*[actor.describe.remote() for actor in self.actors])
        return list(await asyncio.wait_for(calls, self.timeout_s))

    async def ping(self) -> None:
        await asyncio.wait_for(asyncio.gather(*[actor.ping.remote() for actor in self.actors]), self.timeout_s)

    def kill(self) -> None:
        if self._executor is not None:
            self._executor.close()
        for actor in self.actors:
            with contextlib.suppress(Exception):  # best effort on teardown
                ray.kill(actor, no_restart=True)


def stage_name_prefix(model: str) -> str:
    """Stage actor names of this replica: `stage:<model>:<replica actor id>`."""
    return f"stage:{model}:{ray.get_runtime_context().get_actor_id() or 'driver'}"


def stage_recipe(
    prefix: str,
    spec: StageSpec,
    model_dir: Path,
    dtype: str,
    max_len: int,
    pipeline: PipelineSection,
    kv_slots: int | None,
    weight_quant: WeightQuant,
) -> StageRecipe:
    """The config and Ray options of stage `spec` (no placement yet: see `in_bundle`)."""
    name = f"{prefix}:{spec.index}:{spec.start}-{spec.end}"
    config = StageConfig(
        model_dir=str(model_dir),
        spec=spec,
        dtype=dtype,
        kv_slots=kv_slots or pipeline.max_num_seqs,
        max_len=max_len,
        torch_threads=torch_threads_for(pipeline.stage_resources),
        actor_name=name,
        weight_quant=weight_quant,
        low_bit_max_tokens=pipeline.low_bit_max_tokens,
        device=pipeline.device,
        bundle_gpus=pipeline.stage_resources.get("GPU", 0.0),
        max_step_tokens=max_step_tokens(pipeline.max_batch_size, pipeline.prefill_chunk),
        gpu_memory_fraction=pipeline.gpu_memory_fraction,
        cuda_graphs=pipeline.cuda_graphs,
    )
    return StageRecipe(name, config, stage_actor_options(pipeline.stage_resources))


def in_bundle(recipe: StageRecipe, placement_group: Any, bundle_index: int) -> None:
    """Schedule the recipe's actor into bundle `bundle_index` of `placement_group` (None: anywhere)."""
    if placement_group is not None:
        recipe.options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group,
            placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=False,
        )


def _answered(ref: Any) -> bool:
    """True when a stage's ping came back; False when the stage died (a load error is raised)."""
    try:
        ray.get(ref)
    except ray.exceptions.ActorDiedError as exc:
        if "creation task" in str(exc) or "__init__" in str(exc):
            raise  # the stage's constructor failed: loading again would fail the same way
        return False
    return True


def concurrent_stages(infos: list[StageInfo]) -> int:
    """Stages that can compute at the same time: on each node, as many as its CPUs hold teams of their
    threads (3 one-thread stages on 2 cores: 2), summed over the nodes. More steps in flight than this only
    makes the micro-batches smaller (less work per weight read) without adding parallel compute."""
    by_node: dict[str, list[StageInfo]] = {}
    for info in infos:
        by_node.setdefault(info.node_id, []).append(info)
    total = 0
    for stages in by_node.values():
        cpus = max(info.cpus for info in stages)
        threads = max(max(1, info.torch_threads) for info in stages)
        total += len(stages) if cpus <= 0 else min(len(stages), max(1, cpus // threads))
    return max(1, total)
