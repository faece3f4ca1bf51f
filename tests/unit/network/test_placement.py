"""Stage placement over provider nodes: throughput-balanced, memory-bounded, re-planned on departure."""

import pytest

from cluster.network.placement import (
    ModelCost,
    NodeCapacity,
    PlacementError,
    StagePlan,
    capacities_from_records,
    plan_stages,
    plan_to_bundles,
    replan_without,
    stage_memory_bytes,
)
from cluster.network.records import NodeCapabilities, NodeRecord
from serve_apps.engine.layer_split import split_layers

GiB = 2**30
COST = ModelCost(num_layers=30, layer_bytes=100 * 2**20, embed_bytes=200 * 2**20, head_bytes=200 * 2**20)


def node(node_id: str, memory_gib: float = 16, speed: float = 10.0) -> NodeCapacity:
    return NodeCapacity(node_id, int(memory_gib * GiB), speed)


def covers_all_layers(plan: StagePlan, num_layers: int) -> bool:
    bounds = [(s.start, s.end) for s in plan.stages]
    contiguous = all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    return bounds[0][0] == 0 and bounds[-1][1] == num_layers and contiguous


def test_one_roomy_node_takes_the_whole_model() -> None:
    plan = plan_stages(COST, [node("a")], max_stages=4)
    assert [(s.node_id, s.start, s.end) for s in plan.stages] == [("a", 0, 30)]


def test_throughput_two_to_one_gives_about_two_to_one_layers() -> None:
    plan = plan_stages(COST, [node("fast", speed=20.0), node("slow", speed=10.0)], max_stages=2)
    counts = {s.node_id: s.num_layers for s in plan.stages}
    assert counts == {"fast": 20, "slow": 10}
    assert plan.tokens_per_s == pytest.approx(1.0)


def test_memory_caps_a_fast_node() -> None:
    # 1 GiB after 20 % headroom holds (0.8 GiB - embed or head) / 100 MiB = 6 layers.
    plan = plan_stages(COST, [node("fast-small", memory_gib=1, speed=100.0), node("slow-big", speed=1.0)], max_stages=2)
    counts = {s.node_id: s.num_layers for s in plan.stages}
    assert counts["fast-small"] == 6 and sum(counts.values()) == 30
    memory = dict(zip(plan.node_ids, stage_memory_bytes(plan, COST), strict=True))
    assert memory["fast-small"] <= 0.8 * GiB


def test_infeasible_memory_is_a_clear_error() -> None:
    with pytest.raises(PlacementError, match=r"needs 3\.32 GiB but at most 2 nodes offer 1\.60 GiB"):
        plan_stages(COST, [node("a", 1), node("b", 1), node("c", 1)], max_stages=2)
    with pytest.raises(PlacementError, match="no node can hold even one layer"):
        plan_stages(COST, [node("tiny", 0.05)])


def test_a_slow_extra_node_is_not_worth_a_hop() -> None:
    plan = plan_stages(COST, [node("a", speed=10.0), node("crawl", speed=0.1)], max_stages=2, min_stage_gain=0.05)
    assert plan.node_ids == ["a"]


def test_replan_after_a_node_leaves_covers_all_layers_on_the_rest() -> None:
    nodes = [node("a", 2), node("b", 2), node("c", 2), node("d", 2)]
    plan = plan_stages(COST, nodes, max_stages=4)
    assert len(plan.stages) == 4 and plan.uses(["b"])
    again = replan_without(COST, nodes, ["b"], max_stages=4)
    assert "b" not in again.node_ids and covers_all_layers(again, 30) and len(again.stages) == 3


def test_plan_weights_reproduce_the_ranges_with_split_layers() -> None:
    plan = plan_stages(COST, [node("a", speed=30), node("b", speed=20), node("c", speed=10)], max_stages=3)
    specs = split_layers(COST.num_layers, len(plan.stages), weights=plan.weights)
    assert [(s.start, s.end) for s in specs] == [(s.start, s.end) for s in plan.stages]


def test_head_compute_moves_layers_off_the_last_stage() -> None:
    cost = ModelCost(num_layers=30, layer_bytes=2**20, embed_bytes=2**20, head_bytes=2**20, head_layer_equiv=6.0)
    plan = plan_stages(cost, [node("a"), node("b")], max_stages=2)
    assert [s.num_layers for s in plan.stages] == [18, 12]


def test_bundles_pin_each_stage_to_its_node() -> None:
    plan = plan_stages(COST, [node("a", 4), node("b", 4)], max_stages=2)
    bundles, selectors = plan_to_bundles(plan, {"CPU": 1}, memory_bytes=stage_memory_bytes(plan, COST))
    assert selectors == [{"ray.io/node-id": n} for n in plan.node_ids]
    assert bundles[0]["CPU"] == 1.0 and bundles[0]["memory"] == stage_memory_bytes(plan, COST)[0]
    bundles, selectors = plan_to_bundles(plan, {"GPU": 1}, label_key="solanalm.io/node")
    assert bundles == [{"GPU": 1.0}, {"GPU": 1.0}] and "solanalm.io/node" in selectors[0]


def test_capacities_from_records_turn_gflops_into_layer_speed() -> None:
    cost = ModelCost(num_layers=2, layer_bytes=1, embed_bytes=0, head_bytes=0, layer_flops_per_token=1e9)
    gpu = NodeCapabilities(num_gpus=1, memory_bytes=GiB, gpu_memory_bytes=2 * GiB)
    records = [
        NodeRecord("a", "w", capabilities=NodeCapabilities(memory_bytes=GiB, throughput_gflops=50.0)),
        NodeRecord("b", "w", capabilities=gpu),
    ]
    a, b = capacities_from_records(records, cost)
    assert (a.throughput_layers_per_s, a.memory_bytes, a.gpu) == (50.0, GiB, False)
    assert (b.throughput_layers_per_s, b.memory_bytes, b.gpu) == (1.0, 2 * GiB, True)
