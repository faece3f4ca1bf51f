"""Pure routing logic: parse a replica's routing stats, rank replicas by score.

A replica's `pipeline_score` (cluster.network.reputation.pipeline_score over its stages' nodes) is in
[0, 1]; higher is better. Replicas within `tolerance` of the best score of their rank share the rank, so
near-equal replicas split the load (Serve then picks the shorter queue inside a rank). Replicas without
stats (none reported yet, or no registry) fall back to power-of-two choices.
"""

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cluster.config.network import RoutingWeights
from cluster.network.records import NodeRecord
from cluster.network.reputation import pipeline_score


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """What a replica's `record_routing_stats` reports (as a plain dict, Serve's format)."""

    replica_id: str
    node_ids: tuple[str, ...]
    queued: int
    running: int
    pipeline_score: float | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["node_ids"] = list(self.node_ids)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ReplicaStats | None":
        """The stats, or None when missing or malformed (the router then falls back)."""
        if not data:
            return None
        try:
            score = data.get("pipeline_score")
            return cls(
                replica_id=str(data["replica_id"]),
                node_ids=tuple(str(n) for n in data.get("node_ids", ())),
                queued=max(0, int(data.get("queued", 0))),
                running=max(0, int(data.get("running", 0))),
                pipeline_score=None if score is None else min(1.0, max(0.0, float(score))),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class Candidate:
    """One routable replica and its last reported stats (None: not reported)."""

    replica_id: str
    stats: ReplicaStats | None


def score_of(
    node_ids: Sequence[str],
    records: Mapping[str, NodeRecord],
    weights: RoutingWeights,
    queued: int,
    initial_reputation: float,
) -> float:
    """The pipeline score of a replica's nodes. A node the registry does not know (the operator's own
    machine, without a wallet) counts as a fresh node: no history, the initial reputation."""
    chosen = [records.get(n) or NodeRecord(node_id=n, wallet="", reputation=initial_reputation) for n in node_ids]
    return pipeline_score(chosen, weights, queued)


def power_of_two(replica_ids: Sequence[str], rng: random.Random) -> list[str]:
    """Two distinct random replicas (Serve then takes the one with the shorter queue)."""
    if len(replica_ids) <= 2:
        return rng.sample(list(replica_ids), len(replica_ids))
    return rng.sample(list(replica_ids), 2)


def rank_candidates(candidates: Sequence[Candidate], tolerance: float, rng: random.Random) -> list[list[str]]:
    """Ranks of replica ids, most preferred first: scored replicas by descending score (grouped within
    `tolerance`, shuffled within a rank), then a power-of-two pick among the replicas without a score."""
    scored = sorted(
        (c for c in candidates if c.stats is not None and c.stats.pipeline_score is not None),
        key=lambda c: (-(c.stats.pipeline_score or 0.0), c.replica_id),  # type: ignore[union-attr]
    )
    unscored = [c.replica_id for c in candidates if c.stats is None or c.stats.pipeline_score is None]
    ranks: list[list[str]] = []
    top = None
    for candidate in scored:
        score = candidate.stats.pipeline_score  # type: ignore[union-attr]
        if top is None or top - score > tolerance:  # type: ignore[operator]
            ranks.append([])
            top = score
        ranks[-1].append(candidate.replica_id)
    for rank in ranks:
        rng.shuffle(rank)  # Serve takes the first of the shortest queues: ties must not favour one replica
    if unscored:
        ranks.append(power_of_two(unscored, rng))
    return ranks
