"""The hub chain of a pipeline that spans trust domains (serve_apps/server/hybrid.py), with fake stages."""

import asyncio

import pytest
import torch

from serve_apps.engine.executor import StageCallError
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.server.hybrid import HubExecutor
from serve_apps.server.pipeline_server import provider_work


class FakeStage:
    def __init__(self, name: str, provider_id: str | None, last: bool, delay_s: float = 0.0) -> None:
        self.name, self.provider_id, self.last, self.delay_s = name, provider_id, last, delay_s
        self.seen: list[int] = []

    async def forward(self, batch: StepBatch, hidden: torch.Tensor | None):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay_s)
        self.seen.append(batch.step_id)
        base = torch.zeros(batch.num_tokens) if hidden is None else hidden
        if self.last:
            return StepResult(batch.step_id, tuple(int(base.sum().item()) for _ in batch.chunks))
        return base + 1

    async def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _batch(step_id: int, tokens: int = 2) -> StepBatch:
    chunk = SeqChunk("s", 0, 0, tuple(range(tokens)), SamplingParams(temperature=0.0))
    return StepBatch(step_id, (chunk,))


def test_a_step_goes_through_every_stage_in_order() -> None:
    stages = [FakeStage("op", None, False), FakeStage("p1", "provider-a", False), FakeStage("p2", "provider-b", True)]
    result = asyncio.run(HubExecutor(stages).execute(_batch(7)))  # type: ignore[arg-type]
    assert result == StepResult(7, (4,))  # two stages added 1 to each of 2 rows
    assert [s.seen for s in stages] == [[7], [7], [7]]


def test_the_observer_sees_provider_stages_only_with_their_inputs() -> None:
    seen = []
    stages = [FakeStage("op", None, False), FakeStage("p1", "provider-a", False), FakeStage("op2", None, True)]
    executor = HubExecutor(stages, observer=lambda i, b, inputs, out: seen.append((i, inputs.tolist(), out.tolist())))  # type: ignore[arg-type]
    asyncio.run(executor.execute(_batch(1)))
    assert seen == [(1, [1.0, 1.0], [2.0, 2.0])]


def test_a_middle_stage_that_answers_tokens_fails_the_step() -> None:
    stages = [FakeStage("p1", "provider-a", True), FakeStage("p2", "provider-b", True)]
    with pytest.raises(StageCallError, match="answered StepResult"):
        asyncio.run(HubExecutor(stages).execute(_batch(1)))  # type: ignore[arg-type]


def test_a_last_stage_that_answers_hidden_states_fails_the_step() -> None:
    stages = [FakeStage("p1", "provider-a", False)]
    with pytest.raises(StageCallError, match="answered Tensor"):
        asyncio.run(HubExecutor(stages).execute(_batch(1)))  # type: ignore[arg-type]


def test_steps_in_flight_keep_their_order_at_every_stage() -> None:
    stages = [FakeStage("a", "provider-a", False, 0.01), FakeStage("b", "provider-b", True, 0.005)]
    executor = HubExecutor(stages)  # type: ignore[arg-type]

    async def run() -> list[StepResult]:
        return list(await asyncio.gather(*(executor.execute(_batch(i)) for i in range(6))))

    results = asyncio.run(run())
    assert [r.step_id for r in results] == list(range(6))
    assert stages[1].seen == list(range(6))


def test_payees_come_from_the_plan_layers_and_the_proven_wallets() -> None:
    specs = split_layers(30, 3, weights=[10.0, 12.0, 8.0])
    work = provider_work(tuple(specs), [None, "WalletA", "WalletA"])
    assert {w.wallet: w.layers for w in work} == {None: 10, "WalletA": 20}


def test_a_provider_stage_that_failed_a_step_counts_as_dead_for_recovery() -> None:
    from serve_apps.server.hybrid import ProviderLink, ProviderStage

    class Lying:
        async def forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
            raise StageCallError("reply of the wrong shape")

        async def ping(self) -> bool:
            return True  # it still answers pings

        async def close(self) -> None:
            pass

    link = ProviderLink("provider-x", "127.0.0.1:1", b"", "token", "Wallet")
    stage = ProviderStage("p", link, split_layers(4, 1)[0], lambda _link, _spec: Lying())

    async def run() -> tuple[bool, bool]:
        before = await stage.alive()
        with pytest.raises(StageCallError):
            await stage.forward(_batch(1), None)
        return before, await stage.alive()

    assert asyncio.run(run()) == (True, False)


def test_after_a_failover_the_replaced_providers_layers_are_paid_to_the_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request finishing after a provider's stage was replaced pays the operator for those layers, not the
    provider that no longer serves them (PipelineServer.providers reads the pool's current stages)."""
    from types import SimpleNamespace

    import serve_apps.server.hybrid as hybrid
    from serve_apps.server.hybrid import HybridPool, HybridStage, ProviderLink
    from serve_apps.server.pipeline_server import PipelineServer

    class Answers:
        """What an actor method's .remote() returns: awaitable, as an ObjectRef is."""

        def __init__(self, value: object) -> None:
            self.remote = lambda *args: asyncio.sleep(0, value)

    class Recipe:
        def __init__(self, name: str) -> None:
            self.name, self.config, self.options = name, None, {}

        def start(self) -> object:
            return SimpleNamespace(ping=Answers(True), describe=Answers(None))

    class Gone:
        async def forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
            raise StageCallError("connection reset")

        async def ping(self) -> bool:
            return False

        async def close(self) -> None:
            pass

    monkeypatch.setattr(hybrid, "fallback_recipe", lambda recipe: Recipe(recipe.name + ":fallback"))
    specs = tuple(split_layers(6, 2))
    link = ProviderLink("provider-x", "127.0.0.1:1", b"", "token", "ProviderWallet")
    stages = [HybridStage(specs[0], Recipe("s0"), None), HybridStage(specs[1], Recipe("s1"), link)]  # type: ignore[arg-type]
    pool = HybridPool(stages, 5.0, 1, lambda _link, _spec: Gone(), loader=None)  # type: ignore[arg-type]
    server = SimpleNamespace(pool=pool, plan=SimpleNamespace(stages=specs), _operator_payees=())

    before = {w.wallet: w.layers for w in PipelineServer.providers(server)}  # type: ignore[arg-type]
    assert asyncio.run(pool.recover()) and pool.fallbacks == 1
    after = {w.wallet: w.layers for w in PipelineServer.providers(server)}  # type: ignore[arg-type]
    assert before == {None: 3, "ProviderWallet": 3}
    assert after == {None: 6}
