"""Stage placement: from a model's layer costs and the live provider nodes, plan a pipeline's stages.

Pure functions over small frozen dataclasses (no Ray, no weights). The objective is Petals'
throughput-balanced block assignment under exo's memory limits: a pipeline moves tokens at the rate of
its slowest stage, so each stage gets layers in proportion to its node's measured speed, capped by what
fits in the node's memory after headroom. The embedding costs memory on the first stage; norm + lm_head
cost memory and compute on the last.
"""

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster.network.records import NodeRecord

NODE_ID_LABEL = "ray.io/node-id"  # Ray's built-in label (ray.util.placement_group.NODE_ID_LABEL_KEY)
DEFAULT_THROUGHPUT = 1.0  # layers/s of a node that never measured its speed: equal shares


class PlacementError(ValueError):
    """No plan fits: the message says which limit (memory, nodes) was hit."""


@dataclass(frozen=True, slots=True)
class NodeCapacity:
    """A node as placement sees it: memory for weights (bytes) and speed (decoder layers per second)."""

    node_id: str
    memory_bytes: int
    throughput_layers_per_s: float
    gpu: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelCost:
    """Per-layer memory of a decoder-only model (bytes) and the ends' extras; see model_cost.py."""

    num_layers: int
    layer_bytes: int
    embed_bytes: int
    head_bytes: int  # final norm + lm_head
    kv_bytes_per_layer: int = 0  # KV cache reserved per layer for the configured context
    layer_flops_per_token: float = 0.0
    head_layer_equiv: float = 0.0  # lm_head compute in decoder-layer units

    @property
    def per_layer_bytes(self) -> int:
        return self.layer_bytes + self.kv_bytes_per_layer


@dataclass(frozen=True, slots=True)
class PlannedStage:
    """Stage on `node_id` holding decoder layers [start, end)."""

    node_id: str
    start: int
    end: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class StagePlan:
    """An ordered pipeline of stages covering every layer once, and its estimated bottleneck rate."""

    stages: tuple[PlannedStage, ...]
    tokens_per_s: float

    @property
    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.stages]

    @property
    def weights(self) -> list[float]:
        """Layer counts, for `split_layers(num_layers, len(plan.stages), weights=plan.weights)`
        (which reproduces these exact ranges)."""
        return [float(s.num_layers) for s in self.stages]

    def uses(self, node_ids: Iterable[str]) -> bool:
        """True when any of `node_ids` holds a stage (the pipeline must be re-planned if they leave)."""
        return bool(set(node_ids) & set(self.node_ids))


def plan_stages(
    cost: ModelCost,
    nodes: Sequence[NodeCapacity],
    max_stages: int = 8,
    min_memory_headroom: float = 0.2,
    min_stage_gain: float = 0.05,
) -> StagePlan:
    """The fastest pipeline over at most `max_stages` of `nodes`.

    For k = 1..max_stages it tries the k fastest and the k roomiest nodes; a plan with more stages
    replaces the best one only if it is `min_stage_gain` faster (every stage adds a network hop).
    """
    if cost.num_layers < 1:
        raise PlacementError("the model has no layers")
    if max_stages < 1 or not 0 <= min_memory_headroom < 1:
        raise PlacementError("max_stages must be >= 1 and min_memory_headroom in [0, 1)")
    usable = {n.node_id: int(n.memory_bytes * (1 - min_memory_headroom)) for n in nodes}
    candidates = [n for n in nodes if n.throughput_layers_per_s > 0 and usable[n.node_id] >= cost.per_layer_bytes]
    if not candidates:
        raise PlacementError(
            f"no node can hold even one layer ({cost.per_layer_bytes} bytes) "
            f"after {min_memory_headroom:.0%} headroom; nodes: {len(nodes)}"
        )
    by_speed = sorted(candidates, key=lambda n: (-n.throughput_layers_per_s, -n.memory_bytes, n.node_id))
    by_room = sorted(candidates, key=lambda n: (-n.memory_bytes, -n.throughput_layers_per_s, n.node_id))
    best: StagePlan | None = None
    for k in range(1, min(max_stages, len(candidates), cost.num_layers) + 1):
        for chosen in (by_speed[:k], by_room[:k]):
            plan = _best_order(cost, chosen, usable)
            if plan is not None and _better(plan, best, min_stage_gain):
                best = plan
    if best is None:
        total = sum(usable[n.node_id] for n in by_room[:max_stages])
        need = cost.num_layers * cost.per_layer_bytes + cost.embed_bytes + cost.head_bytes
        raise PlacementError(
            f"model needs {need / 2**30:.2f} GiB but at most {max_stages} nodes offer "
            f"{total / 2**30:.2f} GiB after {min_memory_headroom:.0%} headroom"
        )
    return best


def memory_fitted_split(
    cost: ModelCost, stage_memory_bytes: int, min_stages: int = 1, max_stages: int = 8, headroom: float = 0.2
) -> list[int]:
    """Layers per stage for the fewest stages (at least `min_stages`, at most `max_stages`) whose memory each
    holds its share: a stage keeps `headroom` of `stage_memory_bytes` free (KV cache, activations), the first
    also holds the embedding and the last the norm + lm_head. Layers are spread as evenly as those caps allow
    and no stage gets more than fit; PlacementError says what was needed when even `max_stages` cannot."""
    if cost.num_layers < 1:
        raise PlacementError("the model has no layers")
    if not 1 <= min_stages <= max_stages or not 0 <= headroom < 1:
        raise PlacementError("need 1 <= min_stages <= max_stages and headroom in [0, 1)")
    usable = int(stage_memory_bytes * (1 - headroom))
    for k in range(min_stages, min(max_stages, cost.num_layers) + 1):
        caps = _layer_caps(cost, usable, k)
        if min(caps) >= 1 and sum(caps) >= cost.num_layers:
            return _even_within(cost.num_layers, caps)
    stages = min(max_stages, cost.num_layers)
    held = sum(max(0, c) for c in _layer_caps(cost, usable, stages)) if stages > 0 else 0
    raise PlacementError(
        f"the model needs {_gib(cost.num_layers * cost.per_layer_bytes + cost.embed_bytes + cost.head_bytes)} GiB "
        f"({cost.num_layers} layers of {cost.per_layer_bytes / 2**20:.1f} MiB, embedding "
        f"{cost.embed_bytes / 2**20:.1f} MiB, head {cost.head_bytes / 2**20:.1f} MiB) but {stages} stages of "
        f"{_gib(stage_memory_bytes)} GiB ({_gib(usable)} GiB after {headroom:.0%} headroom) hold at most {held} "
        "layers: give each stage more memory (pipeline.stage_resources.memory) or allow more stages "
        "(network.placement.max_stages)"
    )


def _layer_caps(cost: ModelCost, usable: int, stages: int) -> list[int]:
    """Decoder layers each of `stages` stages can hold in `usable` bytes beside the ends' extras."""
    last = stages - 1
    extras = [(cost.embed_bytes if i == 0 else 0) + (cost.head_bytes if i == last else 0) for i in range(stages)]
    return [(usable - extra) // cost.per_layer_bytes for extra in extras]


def _even_within(num_layers: int, caps: Sequence[int]) -> list[int]:
    """`num_layers` split as evenly as `caps` allow (a stage that reaches its cap passes the rest on)."""
    counts = [0] * len(caps)
    left, open_stages = num_layers, [i for i, cap in enumerate(caps) if cap > 0]
    while left > 0 and open_stages:
        share = max(1, left // len(open_stages))
        for i in list(open_stages):
            add = min(share, caps[i] - counts[i], left)
            counts[i] += add
            left -= add
            if counts[i] >= caps[i]:
                open_stages.remove(i)
    return counts


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def replan_without(
    cost: ModelCost, nodes: Sequence[NodeCapacity], departed: Iterable[str], **options: float
) -> StagePlan:
    """Plan again over the nodes that remain after `departed` leave (or die)."""
    gone = set(departed)
    return plan_stages(cost, [n for n in nodes if n.node_id not in gone], **options)  # type: ignore[arg-type]


def stage_memory_bytes(plan: StagePlan, cost: ModelCost) -> list[int]:
    """Weights + KV bytes of each planned stage."""
    last = len(plan.stages) - 1
    return [
        s.num_layers * cost.per_layer_bytes
        + (cost.embed_bytes if i == 0 else 0)
        + (cost.head_bytes if i == last else 0)
        for i, s in enumerate(plan.stages)
    ]


def plan_to_bundles(
    plan: StagePlan,
    stage_resources: Mapping[str, float],
    label_key: str = NODE_ID_LABEL,
    memory_bytes: Sequence[int] | None = None,
) -> tuple[list[dict[str, float]], list[dict[str, str]]]:
    """Placement-group bundles (stage i in bundle i) and per-bundle label selectors pinning each bundle
    to its node: pass them as `placement_group_bundles` and `placement_group_bundle_label_selector` of
    a Serve deployment (or `bundle_label_selector` of `ray.util.placement_group`). With `memory_bytes`
    each bundle also reserves its stage's memory in Ray's accounting."""
    if memory_bytes is not None and len(memory_bytes) != len(plan.stages):
        raise ValueError("memory_bytes needs one value per stage")
    bundles = []
    for i, _ in enumerate(plan.stages):
        bundle = {k: float(v) for k, v in stage_resources.items()}
        if memory_bytes is not None:
            bundle["memory"] = float(memory_bytes[i])
        bundles.append(bundle)
    selectors = [{label_key: s.node_id} for s in plan.stages]
    return bundles, selectors


def capacities_from_records(records: Iterable[NodeRecord], cost: ModelCost) -> list[NodeCapacity]:
    """Placement's view of registry records: speed in layers/s from the measured GFLOP/s and the model's
    per-layer FLOPs per token (equal speeds when either is unknown)."""
    capacities = []
    for record in records:
        caps = record.capabilities
        speed = DEFAULT_THROUGHPUT
        if caps.throughput_gflops > 0 and cost.layer_flops_per_token > 0:
            speed = caps.throughput_gflops * 1e9 / cost.layer_flops_per_token
        capacities.append(
            NodeCapacity(record.node_id, caps.weight_memory_bytes, speed, caps.num_gpus > 0, dict(record.labels))
        )
    return capacities


def _better(plan: StagePlan, best: StagePlan | None, min_stage_gain: float) -> bool:
    if best is None:
        return True
    gain = min_stage_gain if len(plan.stages) > len(best.stages) else 0.0
    return plan.tokens_per_s > best.tokens_per_s * (1 + gain)


def _best_order(cost: ModelCost, chosen: Sequence[NodeCapacity], usable: Mapping[str, int]) -> StagePlan | None:
    """Try each node as the last stage (lm_head) and the two roomiest as the first (embedding); the
    middle stages keep the fastest-first order."""
    if len(chosen) == 1:
        return _assign(cost, list(chosen), usable)
    roomiest = sorted(chosen, key=lambda n: (-usable[n.node_id], n.node_id))[:2]
    best: StagePlan | None = None
    for first in roomiest:
        for last in chosen:
            if last is first:
                continue
            middle = [n for n in chosen if n is not first and n is not last]
            plan = _assign(cost, [first, *middle, last], usable)
            if plan is not None and _better(plan, best, 0.0):
                best = plan
    return best


def _assign(cost: ModelCost, ordered: list[NodeCapacity], usable: Mapping[str, int]) -> StagePlan | None:
    """Layers per stage minimising the slowest stage's time per token, within memory (greedy: each next
    layer goes where it finishes soonest, optimal for this min-max); None when it does not fit."""
    k, last = len(ordered), len(ordered) - 1
    extra_bytes = [(cost.embed_bytes if i == 0 else 0) + (cost.head_bytes if i == last else 0) for i in range(k)]
    extra_work = [cost.head_layer_equiv if i == last else 0.0 for i in range(k)]
    speed = [n.throughput_layers_per_s for n in ordered]
    caps = [(usable[n.node_id] - extra_bytes[i]) // cost.per_layer_bytes for i, n in enumerate(ordered)]
    if min(caps) < 1 or sum(caps) < cost.num_layers:
        return None
    counts = [1] * k
    heap = [((2 + extra_work[i]) / speed[i], i) for i in range(k) if caps[i] > 1]
    heapq.heapify(heap)
    for _ in range(cost.num_layers - k):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        if counts[i] < caps[i]:
            heapq.heappush(heap, ((counts[i] + 1 + extra_work[i]) / speed[i], i))
    slowest = max((counts[i] + extra_work[i]) / speed[i] for i in range(k))
    stages, start = [], 0
    for node, count in zip(ordered, counts, strict=True):
        stages.append(PlannedStage(node.node_id, start, start + count))
        start += count
    return StagePlan(tuple(stages), tokens_per_s=1.0 / slowest)
