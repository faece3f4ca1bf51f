"""Placement of every served model over the provider nodes, and when a deployed placement must change.

Pure functions over registry records and `StagePlan`s (no Ray): `plan_models` plans each model in turn
over what the models before it left free; `placements_args` writes plans as the `pipeline.placements`
settings the builder deploys; `departed_nodes` says which planned nodes left (dead or draining), so the
controller (cluster/network/replacement.py) knows when to re-plan.
"""

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from cluster.config.network import PlacementSection
from cluster.network.placement import (
    ModelCost,
    PlacementError,
    StagePlan,
    capacities_from_records,
    memory_fitted_split,
    plan_stages,
    stage_memory_bytes,
)
from cluster.network.records import NodeRecord

PROVIDER_ID_PREFIX = "provider-"  # registry ids of providers' stage hosts (outside the Ray cluster)


def is_provider_host(node_id: str | None) -> bool:
    """True for a provider's stage host (reached over the stage protocol), False for a Ray node of the operator."""
    return bool(node_id) and str(node_id).startswith(PROVIDER_ID_PREFIX)


def operator_stage_indices(node_ids: list[str] | None, num_stages: int) -> list[int]:
    """The stages that run as actors in the replica's placement group (every stage without a plan)."""
    if node_ids is None:
        return list(range(num_stages))
    return [index for index, node_id in enumerate(node_ids) if not is_provider_host(node_id)]


def plan_models(
    costs: Mapping[str, ModelCost], records: Iterable[NodeRecord], section: PlacementSection
) -> dict[str, StagePlan]:
    """One StagePlan per model over the eligible `records`; each model's stages use up memory on their nodes
    before the next model is planned (PlacementError when a model no longer fits)."""
    records = list(records)
    free: dict[str, int] | None = None
    plans = {}
    for model, cost in costs.items():
        nodes = capacities_from_records(records, cost)
        if free is None:
            free = {n.node_id: n.memory_bytes for n in nodes}
        nodes = [replace(n, memory_bytes=free[n.node_id]) for n in nodes]
        plan = plan_stages(cost, nodes, section.max_stages, section.memory_headroom, section.min_stage_gain)
        for stage, used in zip(plan.stages, stage_memory_bytes(plan, cost), strict=True):
            free[stage.node_id] -= used
        plans[model] = plan
    return plans


def memory_fitted_layers(
    costs: Mapping[str, ModelCost],
    num_stages: int,
    stage_memory_bytes: int,
    section: PlacementSection,
    explicit_memory: bool = False,
) -> dict[str, list[int]]:
    """Layers per stage of each model that must be split differently from `num_stages` equal shares to fit
    `stage_memory_bytes` per stage: more stages where the layers do not fit (PlacementError naming the model
    when even `section.max_stages` cannot hold it). With `explicit_memory` (the bundle's memory was set)
    every model gets its fitted split, so no stage is given more layers than fit; otherwise models that fit
    `num_stages` stages keep the engine's own split (absent from the result)."""
    fitted = {}
    for model, cost in costs.items():
        first = min(num_stages, cost.num_layers)
        limit = max(section.max_stages, first)
        try:
            layers = memory_fitted_split(cost, stage_memory_bytes, first, limit, section.memory_headroom)
        except PlacementError as exc:
            raise PlacementError(f"{model}: {exc}") from None
        if explicit_memory or len(layers) != num_stages:
            fitted[model] = layers
    return fitted


def placements_args(plans: Mapping[str, StagePlan]) -> dict[str, dict[str, Any]]:
    """`pipeline.placements` settings: per model, layers per stage and the node of each stage."""
    return {
        model: {"stage_layers": [s.num_layers for s in plan.stages], "node_ids": plan.node_ids}
        for model, plan in plans.items()
    }


def departed_nodes(
    plans: Mapping[str, StagePlan], records: Iterable[NodeRecord], min_reputation: float = 0.0
) -> set[str]:
    """Planned nodes that no longer serve: dead, draining, under the reputation floor, or unknown."""
    serving = {r.node_id for r in records if r.health == "alive" and not r.draining and r.reputation >= min_reputation}
    return {node for plan in plans.values() for node in plan.node_ids if node not in serving}


def affected_models(plans: Mapping[str, StagePlan], departed: Iterable[str]) -> list[str]:
    """The models whose pipelines have a stage on a departed node."""
    gone = set(departed)
    return [model for model, plan in plans.items() if plan.uses(gone)]


def describe_plan(plan: StagePlan) -> str:
    """One line per plan: `node[:12] layers a-b` for each stage, and the estimated rate."""
    stages = ", ".join(f"{s.node_id[:12]} layers {s.start}-{s.end}" for s in plan.stages)
    return f"{len(plan.stages)} stages: {stages} (~{plan.tokens_per_s:.3g} tokens/s bottleneck)"
