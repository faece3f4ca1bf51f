"""Serving placement over registry records and the re-placement controller, without Ray."""

from dataclasses import replace

import pytest

from cluster.config.network import PlacementSection
from cluster.network.placement import ModelCost, PlacementError, StagePlan, stage_memory_bytes
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.replacement import PlacementController
from cluster.network.serving_plan import (
    affected_models,
    departed_nodes,
    describe_plan,
    placements_args,
    plan_models,
)

GIB = 2**30
COST = ModelCost(
    num_layers=30, layer_bytes=GIB // 10, embed_bytes=GIB // 10, head_bytes=GIB // 10, layer_flops_per_token=1e9
)
SECTION = PlacementSection(min_stage_gain=0.0, memory_headroom=0.0)


def node(node_id: str, gflops: float, memory_gib: float = 16, **changes: object) -> NodeRecord:
    record = NodeRecord(
        node_id,
        wallet=f"w-{node_id}",
        capabilities=NodeCapabilities(memory_bytes=int(memory_gib * GIB), throughput_gflops=gflops),
    )
    return replace(record, **changes)  # type: ignore[arg-type]


def test_models_share_node_memory_in_turn() -> None:
    records = [node("a", 20, memory_gib=4.0)]
    plans = plan_models({"m1": COST}, records, SECTION)
    assert plans["m1"].node_ids == ["a"] and plans["m1"].stages[0].num_layers == 30
    with pytest.raises(PlacementError):  # 2 x 3.2 GiB do not fit in 4 GiB: the second model sees what is left
        plan_models({"m1": COST, "m2": COST}, records, SECTION)
    both = plan_models({"m1": COST, "m2": COST}, [*records, node("b", 20, memory_gib=4.0)], SECTION)
    used = {"a": 0, "b": 0}
    for plan in both.values():
        for stage, size in zip(plan.stages, stage_memory_bytes(plan, COST), strict=True):
            used[stage.node_id] += size
    assert max(used.values()) <= 4 * GIB and sum(used.values()) == 2 * 32 * (GIB // 10)


def test_placements_args_are_valid_pipeline_settings() -> None:
    from cluster.config.serving import PipelineSection

    plans = plan_models({"m": COST}, [node("a", 20), node("b", 10)], SECTION)
    args = placements_args(plans)
    assert args == {"m": {"stage_layers": [s.num_layers for s in plans["m"].stages], "node_ids": ["a", "b"]}}
    assert sum(args["m"]["stage_layers"]) == 30 and args["m"]["stage_layers"][0] == 20
    assert PipelineSection.model_validate({"placements": args}).placements["m"].node_ids == ["a", "b"]
    assert "2 stages: a layers 0-20, b layers 20-30" in describe_plan(plans["m"])


def test_dead_draining_and_forgotten_nodes_have_departed() -> None:
    plans = plan_models({"m": COST, "n": COST}, [node("a", 20), node("b", 10), node("c", 10)], SECTION)
    alive = [node("a", 20), node("b", 10), node("c", 10)]
    assert departed_nodes(plans, alive) == set()
    used = sorted({n for p in plans.values() for n in p.node_ids})
    gone = used[0]
    for records in ([node(gone, 1, health="dead")], [node(gone, 1, draining=True, health="draining")], []):
        others = [r for r in alive if r.node_id != gone]
        assert departed_nodes(plans, [*others, *records]) == {gone}
    assert set(affected_models(plans, {gone})) == {m for m, p in plans.items() if gone in p.node_ids}


class FakeCluster:
    """The registry's records and the deployed plans: the controller's two seams."""

    def __init__(self, records: list[NodeRecord]) -> None:
        self.records = records
        self.deployed: list[dict[str, StagePlan]] = []

    def controller(self, plans: dict[str, StagePlan]) -> PlacementController:
        return PlacementController(
            {"m": COST}, plans, SECTION, lambda: list(self.records), self.deployed.append, min_reputation=0.2
        )


def test_controller_replans_without_the_departed_node_and_redeploys_once() -> None:
    cluster = FakeCluster([node("a", 20), node("b", 10), node("c", 5, reputation=0.1)])
    plans = plan_models({"m": COST}, cluster.records[:2], SECTION)
    controller = cluster.controller(plans)
    assert controller.check() is None and cluster.deployed == []

    cluster.records[1] = node("b", 10, health="dead")
    event = controller.check()
    assert event is not None and event.departed == ("b",) and event.models == ("m",)
    assert cluster.deployed == [event.plans] and event.plans["m"].node_ids == ["a"]  # c is under the floor
    assert controller.plans == event.plans and controller.check() is None  # nothing more to do


def test_controller_falls_back_to_the_equal_split_when_no_provider_is_left() -> None:
    cluster = FakeCluster([node("a", 20)])
    controller = cluster.controller(plan_models({"m": COST}, cluster.records, SECTION))
    cluster.records = [node("a", 20, draining=True, health="draining")]
    event = controller.check()
    assert event is not None and event.plans == {} and cluster.deployed == [{}]


def test_controller_falls_back_when_the_rest_cannot_hold_the_model() -> None:
    cluster = FakeCluster([node("a", 20, memory_gib=2.0), node("b", 20, memory_gib=2.0)])
    controller = cluster.controller(plan_models({"m": COST}, cluster.records, SECTION))
    cluster.records[0] = node("a", 20, memory_gib=2.0, health="dead")
    event = controller.check()
    assert event is not None and event.plans == {}


def test_node_plan_is_a_dry_run_command() -> None:
    from typer.testing import CliRunner

    from cluster.network.cli import app

    result = CliRunner().invoke(app, ["plan", "--help"])
    assert result.exit_code == 0 and "Dry run" in result.output and "--model" in result.output


def test_a_replan_asked_by_the_operator_uses_the_nodes_current_figures() -> None:
    from cluster.config.network import NetworkSection
    from cluster.network.registry import NetworkRegistry

    registry = NetworkRegistry(NetworkSection())
    cluster = FakeCluster([node("a", 20), node("b", 20)])
    plans = plan_models({"m": COST}, cluster.records, SECTION)
    controller = PlacementController(
        {"m": COST}, plans, SECTION, lambda: list(cluster.records), cluster.deployed.append,
        requests=registry.take_replan_requests,
    )  # fmt: skip
    assert controller.check() is None
    cluster.records[1] = node("b", 2)  # b got slower: without a request (same node set) nothing moves
    assert controller.check() is None and cluster.deployed == []
    assert registry.request_replan(["m", "not-served"]) == ["m", "not-served"]
    event = controller.check()
    assert event is not None and event.models == ("m",) and cluster.deployed == [event.plans]
    assert event.plans["m"].stages[0].num_layers > plans["m"].stages[0].num_layers  # a carries more now
    assert registry.take_replan_requests() == [] and controller.check() is None  # taken once
    registry.request_replan(["m"])
    assert controller.check() is None and len(cluster.deployed) == 1  # asked again, same figures: no redeploy
