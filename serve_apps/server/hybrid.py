"""Pipelines whose stages span trust domains: operator stage actors and providers' stage hosts.

A provider's stage host is not a member of the operator's Ray cluster. The coordinator (this replica)
reaches it over the stage protocol (`serve_apps.stagehost`: gRPC over TLS with the provider's pinned
certificate, a per-provider link token, protobuf messages checked against the plan). The chain is a hub:
every step goes coordinator -> stage 0 -> coordinator -> stage 1 -> ... (Petals' client-driven chain), so

- providers never talk to each other, and never learn each other's addresses or link tokens;
- the coordinator sees each provider stage's exact inputs and outputs, which is what served-traffic
  verification needs (`observer`: commitments of every output, inputs of the audited sequences);
- a stage that disappears or answers out of protocol fails the step like a dead stage actor; `recover`
  replaces it (a provider stage by an operator stage actor on this replica's node, from the operator's
  own weights) and the engine replays the live sequences on the new chain.

A hop costs one more network round trip than the operator's direct stage-to-stage links; across a
wide-area network the engine hides it by keeping several steps in flight (docs/benchmarks.md).
"""

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve_apps.engine.executor import StageCallError
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import StageInfo, StepBatch, StepResult
from serve_apps.server.stages import LOAD_TIMEOUT_S, StageRecipe

logger = logging.getLogger(__name__)
T = TypeVar("T")

StageOutput = torch.Tensor | StepResult
# (stage index, batch, the inputs it was sent, what it answered): the served-traffic audit's hook
StepObserver = Callable[[int, StepBatch, torch.Tensor | None, StageOutput], None]
ClientFactory = Callable[["ProviderLink", StageSpec], Any]  # a stage-protocol client (serve_apps.stagehost)


@dataclass(frozen=True, slots=True)
class ProviderLink:
    """How the coordinator reaches one registered provider (from the registry, operator domain only)."""

    provider_id: str
    endpoint: str  # host:port of its stage host
    cert_pem: bytes  # its self-signed certificate, pinned (it was signed into the registration)
    link_token: str  # presented to its stage host; issued by the registry at registration
    wallet: str  # proven at registration: the only wallet its stages' work is paid to


class StageEndpoint(Protocol):
    """One stage of a hub chain, wherever it runs."""

    name: str
    provider_id: str | None  # None: an operator stage

    async def forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> StageOutput: ...

    async def alive(self) -> bool: ...

    async def describe(self) -> StageInfo: ...

    def close(self) -> None: ...


class LocalStage:
    """An operator stage actor (a Ray actor in this replica's placement group, or a fallback)."""

    provider_id: str | None = None

    def __init__(self, name: str, actor: Any, timeout_s: float) -> None:
        self.name = name
        self.actor = actor
        self.timeout_s = timeout_s

    async def forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> StageOutput:
        try:
            return await asyncio.wait_for(self.actor.forward.remote(batch, hidden), self.timeout_s)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            raise StageCallError(f"stage {self.name}: step {batch.step_id} failed: {exc}") from exc

    async def alive(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.actor.ping.remote(), self.timeout_s))
        except (TimeoutError, ray.exceptions.RayError):
            return False

    async def describe(self) -> StageInfo:
        info: StageInfo = await asyncio.wait_for(self.actor.describe.remote(), self.timeout_s)
        return info

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort on teardown
            ray.kill(self.actor, no_restart=True)


class ProviderStage:
    """A provider's stage host over the stage protocol. The gRPC client is bound to the event loop that
    uses it, so it is made lazily per loop (the replica's constructor and its serving loop differ); the
    host's name for the stage loaded (`stage_id`, one host may hold several) passes to each new client."""

    def __init__(self, name: str, link: ProviderLink, spec: StageSpec, client_factory: ClientFactory) -> None:
        self.name = name
        self.link = link
        self.spec = spec
        self.provider_id: str | None = link.provider_id
        self._factory = client_factory
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: str | None = None  # why a step failed here: the pool replaces it as if it were dead
        self.stage_id = ""  # set by the loader from the client that loaded the stage

    def client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self.close()
            self._client, self._loop = self._factory(self.link, self.spec), loop
            if self.stage_id:
                self._client.stage_id = self.stage_id
        return self._client

    async def forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> StageOutput:
        try:
            out: StageOutput = await self.client().forward(batch, hidden)
        except StageCallError as exc:
            # An answer out of protocol, an error reply, a stall or a lost link: a provider that answers
            # pings but not steps must not hold the pipeline in a replay loop.
            self.failed = str(exc)
            raise
        return out

    async def alive(self) -> bool:
        return self.failed is None and bool(await self.client().ping())

    async def describe(self) -> StageInfo:
        """The stage host's own description, but placed by the registry's id (it is no Ray node). What a
        provider says of its work here (steps, busy time) is shown to operators, never used for pay."""
        info: StageInfo = await self.client().describe()
        return replace(info, node_id=self.link.provider_id)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        closing = client.close()
        if asyncio.iscoroutine(closing):
            loop = self._loop
            if loop is not None and loop.is_running() and not loop.is_closed():
                loop.create_task(closing)
            else:
                closing.close()


class HubExecutor:
    """Runs each step through the stages in order from the coordinator; any number of steps in flight."""

    transport = "hub"

    def __init__(self, stages: list[StageEndpoint], observer: StepObserver | None = None) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = stages  # shared with the pool: a replaced stage is used from the next step
        self.observer = observer
        self.generation = 0  # the pool's recoveries: a step of an older chain is void, and not observed

    async def execute(self, batch: StepBatch) -> StepResult:
        hidden: torch.Tensor | None = None
        generation = self.generation
        for index, stage in enumerate(list(self.stages)):
            out = await stage.forward(batch, hidden)
            last = index == len(self.stages) - 1
            if last != isinstance(out, StepResult):
                raise StageCallError(f"stage {stage.name} answered {type(out).__name__} at position {index}")
            if stage.provider_id is not None and self.observer is not None and generation == self.generation:
                self.observer(index, batch, hidden, out)
            if isinstance(out, StepResult):
                return out
            hidden = out
        raise StageCallError("the chain ended without a result")  # unreachable: the last stage returns one

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


@dataclass(frozen=True, slots=True)
class HybridStage:
    """Stage i of a hybrid pipeline: its layers and where it runs (a bundle's recipe, or a provider)."""

    spec: StageSpec
    recipe: StageRecipe  # how the operator runs it: in its bundle, or (provider stages) as the fallback
    link: ProviderLink | None = None


class HybridPool:
    """The stages of a pipeline over operator actors and provider stage hosts, with the StagePool's
    interface (executor, recover, describe, ping, kill) as the engine and PipelineServer use it."""

    def __init__(
        self,
        stages: list[HybridStage],
        timeout_s: float,
        max_inflight: int,
        client_factory: ClientFactory,
        loader: Callable[[ProviderStage, HybridStage], Awaitable[StageInfo]],
        audit: Any = None,
    ) -> None:
        self.stages = stages
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.transport = "hub"
        self.restarts = 0
        self.fallbacks = 0  # provider stages replaced by operator stage actors
        self._factory = client_factory
        self._loader = loader
        self.endpoints: list[StageEndpoint] = [self._endpoint(stage) for stage in stages]
        # Served-traffic verification (serve_apps.verification.audit.ServedAudit): it observes every
        # provider stage's steps; the coordinator admits and finishes sequences on it.
        self.audit = audit
        self._executor = HubExecutor(self.endpoints, audit.observe if audit is not None else None)
        self._recovering = asyncio.Lock()

    @property
    def names(self) -> list[str]:
        return [endpoint.name for endpoint in self.endpoints]

    @property
    def actors(self) -> list[Any]:
        """The operator stage actors (chaos tooling reaches only these)."""
        return [e.actor for e in self.endpoints if isinstance(e, LocalStage)]

    def _endpoint(self, stage: HybridStage) -> StageEndpoint:
        if stage.link is None:
            return LocalStage(stage.recipe.name, stage.recipe.start(), self.timeout_s)
        name = f"{stage.link.provider_id}:{stage.spec.start}-{stage.spec.end}"
        return ProviderStage(name, stage.link, stage.spec, self._factory)

    def wait_ready(self) -> None:
        """Load every provider stage (the provider checks its weights' digest) and wait for the actors."""
        _run_blocking(self._load_all(), LOAD_TIMEOUT_S + self.timeout_s)

    async def _load_all(self) -> None:
        async def ready(endpoint: StageEndpoint, stage: HybridStage) -> None:
            if isinstance(endpoint, ProviderStage):
                await self._loader(endpoint, stage)
            elif not await _wait_alive(endpoint, LOAD_TIMEOUT_S):
                raise RuntimeError(f"stage {endpoint.name} did not start")

        try:
            await asyncio.gather(*(ready(e, s) for e, s in zip(self.endpoints, self.stages, strict=True)))
        finally:
            for endpoint in self.endpoints:
                if isinstance(endpoint, ProviderStage):
                    endpoint.close()  # the serving loop opens its own streams

    def executor(self) -> HubExecutor:
        return self._executor

    def stage_wallets(self) -> list[str | None]:
        """Each stage's payee: the provider's proven wallet, None for the operator's own stages."""
        return [e.link.wallet if isinstance(e, ProviderStage) else None for e in self.endpoints]

    def node_ids(self) -> list[str]:
        """Each stage's host: the provider id, or the operator node's Ray id (blocking; used at start-up)."""
        local = [e.actor.describe.remote() for e in self.endpoints if isinstance(e, LocalStage)]
        infos = iter(ray.get(local, timeout=self.timeout_s))
        return [e.provider_id if e.provider_id is not None else next(infos).node_id for e in self.endpoints]

    async def recover(self) -> bool:
        """Replace every stage that does not answer: an operator stage in its bundle, a provider stage by an
        operator stage actor on this replica's node (its layers from the operator's own weights). The engine
        then replays every live sequence: what the audit recorded of them so far is closed, still judged."""
        async with self._recovering:
            self._executor.generation += 1  # steps still in flight belong to the chain being replaced
            alive = await asyncio.gather(*(e.alive() for e in self.endpoints))
            for index, ok in enumerate(alive):
                if not ok:
                    await self._replace(index)
            recovered = all(await asyncio.gather(*(e.alive() for e in self.endpoints)))
            if recovered and self.audit is not None:
                for seq_id in self.audit.audited_ids():
                    self.audit.drop(seq_id)
            return recovered

    async def _replace(self, index: int) -> None:
        old, stage = self.endpoints[index], self.stages[index]
        old.close()
        if isinstance(old, ProviderStage):
            reason = old.failed or "it does not answer"
            logger.warning(
                "provider stage %s failed (%s); an operator stage takes layers %s", old.name, reason, stage.spec
            )
            recipe = fallback_recipe(stage.recipe)
            self.fallbacks += 1
        else:
            logger.warning("stage %s is dead; recreating it in its bundle", old.name)
            recipe = stage.recipe
        endpoint = LocalStage(recipe.name, await _start_named(recipe), self.timeout_s)
        if not await _wait_alive(endpoint, LOAD_TIMEOUT_S):
            raise StageCallError(f"replacement stage {recipe.name} did not start")
        self.stages[index] = HybridStage(stage.spec, recipe, None)
        self.endpoints[index] = endpoint  # the executor shares this list
        if self.audit is not None:
            self.audit.set_stage(index, None)  # the operator's own stage now: nothing to audit
        self.restarts += 1

    async def describe(self) -> list[StageInfo]:
        return list(await asyncio.wait_for(asyncio.gather(*(e.describe() for e in self.endpoints)), self.timeout_s))

    async def ping(self) -> None:
        if not all(await asyncio.gather(*(e.alive() for e in self.endpoints))):
            raise RuntimeError("a stage does not answer")

    def kill(self) -> None:
        self._executor.close()


def fallback_recipe(recipe: StageRecipe) -> StageRecipe:
    """An operator stage actor for a provider's layers: on this replica's node (where its weights are),
    outside the placement group, reserving no CPU (it borrows the operator's capacity until re-placement)."""
    options = {k: v for k, v in recipe.options.items() if k not in ("scheduling_strategy", "num_cpus", "num_gpus")}
    options["num_cpus"] = 0
    node_id = ray.get_runtime_context().get_node_id()
    options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    return StageRecipe(f"{recipe.name}:fallback", recipe.config, options)


async def _start_named(recipe: StageRecipe, retries: int = 20) -> Any:
    for _ in range(retries):
        try:
            return recipe.start()
        except ValueError:  # the name is still held by a dead actor
            await asyncio.sleep(0.5)
    raise StageCallError(f"could not start stage {recipe.name}: its name stays taken")


async def _wait_alive(endpoint: StageEndpoint, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if await endpoint.alive():
            return True
        await asyncio.sleep(0.5)
    return False


def _run_blocking(coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """Run a coroutine to completion from synchronous code (the replica's constructor), in its own loop
    on a thread, so it works whether or not the caller's thread already runs an event loop."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = asyncio.run(asyncio.wait_for(coro, timeout_s))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="hybrid-pool-setup", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
