"""The background verifier over two in-process 'replicas' (real tiny stages, the routing hint honoured
as Serve's router and the replica do), and what a verdict reports."""

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.config.network import NetworkSection
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.messages import SamplingParams
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.protocol import GenerateRequest
from serve_apps.routing.ranking import RoutingHint, apply_hint, hint_violation
from serve_apps.verification.protocol import Culprit, StageTrace, TraceRequest, TraceResult, Verdict
from serve_apps.verification.referee import reference_fingerprint, stage_spec
from serve_apps.verification.reporting import VerificationReporter
from serve_apps.verification.verifier import Verifier

HISTORY = (5, 17, 99, 3, 250, 8, 41, 7)
REQUEST = GenerateRequest("cmpl-1", "tiny", SamplingParams(), prompt="hi")


class Replica:
    """A pipeline of real StageWorkers that traces like PipelineServer.trace (wallet w-<name>)."""

    def __init__(self, name: str, model_dir: Path, faulty_stage: int | None = None) -> None:
        self.name, self.model_dir = name, model_dir
        self.workers = [StageWorker(StageConfig(str(model_dir), s, "float32", 1, 64, 1)) for s in split_layers(6, 3)]
        if faulty_stage is not None:
            self.workers[faulty_stage].inject_fault(faulty_stage, 0.5, 7)

    def trace(self, request: TraceRequest, hint: RoutingHint | None) -> TraceResult:
        if (refused := hint_violation(hint, self.name)) is not None:
            return TraceResult(self.name, "tiny", "", "float32", (), (), error=refused)
        ids = request.token_ids or HISTORY  # a tokenizer-free stand-in for the served prompt
        current: Any = torch.tensor([list(ids)])
        stages, inputs = [], []
        for w in self.workers:
            inputs.append(current)
            current, print_ = w.trace(current, request.fingerprint_dims)
            stages.append(
                StageTrace(
                    w.spec.index, w.spec.start, w.spec.end, f"{self.name}-n{w.spec.index}", f"w-{self.name}", print_
                )
            )
        kept = tuple(inputs) if request.keep_inputs else ()
        return TraceResult(self.name, "tiny", str(self.model_dir), "float32", tuple(ids), tuple(stages), kept)


class Handle:
    """Stands in for the deployment handle: routes by the hint like ReputationRouter (first allowed)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = {r.name: r for r in replicas}
        self.trace = self

    def remote(self, request: TraceRequest, routing_hint: RoutingHint | None = None) -> Any:
        chosen = (apply_hint(list(self.replicas), routing_hint) or list(self.replicas))[0]

        async def call() -> TraceResult:
            return self.replicas[chosen].trace(request, routing_hint)

        return call()


def verifier(
    replicas: list[Replica], reports: list[tuple[Verdict, TraceResult, TraceResult]], fraction: float = 1.0
) -> Verifier:
    async def referee(served: TraceResult, stage: int, dims: int) -> tuple[float, ...]:
        spec = stage_spec(stage, served.stages[stage].layer_start, served.stages[stage].layer_end, len(served.stages))
        return reference_fingerprint(served.model_dir, spec, served.dtype, served.inputs[stage], dims)

    async def reporter(request: GenerateRequest, verdict: Verdict, served: TraceResult, other: TraceResult) -> None:
        reports.append((verdict, served, other))

    network = NetworkSection(verification_fraction=fraction)
    return Verifier({"tiny": Handle(replicas)}, network, referee, reporter, sample=lambda: 0.5)


def test_a_faulty_served_pipeline_is_caught_at_its_stage(tiny_dir: Path) -> None:
    reports: list = []
    check = verifier([Replica("bad", tiny_dir, faulty_stage=2), Replica("good", tiny_dir)], reports)
    verdict = asyncio.run(check.verify(REQUEST, "bad", "there"))
    assert verdict.outcome == "failed" and verdict.stage_index == 2
    assert verdict.served_culprits == (Culprit("bad", 2, "bad-n2", "w-bad"),)
    assert reports[0][1].replica_id == "bad" and reports[0][2].replica_id == "good"  # pinned, then elsewhere
    assert check.stats.failed == 1


def test_healthy_pipelines_pass(tiny_dir: Path) -> None:
    reports: list = []
    verdict = asyncio.run(verifier([Replica("a", tiny_dir), Replica("b", tiny_dir)], reports).verify(REQUEST, "b", ""))
    assert verdict.outcome == "passed" and reports[0][1].replica_id == "b" and reports[0][2].replica_id == "a"


def test_with_a_single_replica_the_check_is_inconclusive(tiny_dir: Path) -> None:
    reports: list = []
    verdict = asyncio.run(verifier([Replica("only", tiny_dir)], reports).verify(REQUEST, "only", ""))
    assert verdict.outcome == "inconclusive" and "other than" in verdict.detail


def test_sampling_follows_the_fraction(tiny_dir: Path) -> None:
    replicas = [Replica("a", tiny_dir), Replica("b", tiny_dir)]

    async def submit(fraction: float) -> bool:
        task = verifier(replicas, [], fraction).submit(REQUEST, "a", "")
        if task is not None:
            await task
        return task is not None

    assert asyncio.run(submit(1.0)) and not asyncio.run(submit(0.4))  # sample() is 0.5
    assert not asyncio.run(submit(0.0))


class FakeReporter(VerificationReporter):
    def __init__(self) -> None:
        self.withheld: list[tuple[str, list[str | None]]] = []

        async def withhold(request_id: str, wallets: Any, reason: str) -> None:
            self.withheld.append((request_id, list(wallets)))

        super().__init__(NetworkSection(), "ns", withhold)
        self.recorded: list[tuple[list[str], bool]] = []

    async def record(self, node_ids: list[str], passed: bool) -> None:
        self.recorded.append((node_ids, passed))


def trace(name: str) -> TraceResult:
    stages = tuple(StageTrace(i, i, i + 1, f"{name}-n{i}", f"w-{name}", (0.0,)) for i in range(2))
    return TraceResult(name, "tiny", "", "float32", HISTORY, stages)


@pytest.mark.parametrize("culprit, withheld", [("served", [("cmpl-1", ["w-served"])]), ("other", [])])
def test_a_failure_lowers_the_culprits_and_withholds_only_the_served_ones(culprit: str, withheld: list) -> None:
    reporter = FakeReporter()
    verdict = Verdict("failed", "x", 1, (Culprit(culprit, 1, f"{culprit}-n1", f"w-{culprit}"),), "served")
    asyncio.run(reporter(REQUEST, verdict, trace("served"), trace("other")))
    assert reporter.recorded == [([f"{culprit}-n1"], False)] and reporter.withheld == withheld


def test_a_pass_raises_every_node_and_withholds_nothing() -> None:
    reporter = FakeReporter()
    asyncio.run(reporter(REQUEST, Verdict("passed", "ok", served_replica="served"), trace("served"), trace("other")))
    assert reporter.recorded == [(["other-n0", "other-n1", "served-n0", "served-n1"], True)]
    assert reporter.withheld == []


def test_an_inconclusive_check_changes_nothing() -> None:
    reporter = FakeReporter()
    asyncio.run(reporter(REQUEST, Verdict("inconclusive", "?"), trace("served"), trace("other")))
    assert reporter.recorded == [] and reporter.withheld == []
