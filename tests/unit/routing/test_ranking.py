"""The router's pure ranking: scores from registry records, ranks, power-of-two fallback."""

import random
from dataclasses import replace

import pytest

from cluster.config.network import RoutingWeights
from cluster.network.records import NodeRecord
from serve_apps.routing.ranking import (
    Candidate,
    ReplicaStats,
    power_of_two,
    rank_candidates,
    score_of,
)

WEIGHTS = RoutingWeights()


def stats(replica: str, score: float | None, queued: int = 0) -> ReplicaStats:
    return ReplicaStats(replica, ("n1",), queued, 0, score)


def test_stats_round_trip_and_malformed_stats_are_missing() -> None:
    original = ReplicaStats("r1", ("a", "b"), 3, 1, 0.7)
    assert ReplicaStats.from_dict(original.to_dict()) == original
    assert ReplicaStats.from_dict({}) is None and ReplicaStats.from_dict(None) is None
    assert ReplicaStats.from_dict({"node_ids": ["a"]}) is None  # no replica id
    assert ReplicaStats.from_dict({"replica_id": "r", "queued": "many"}) is None
    assert ReplicaStats.from_dict({"replica_id": "r", "pipeline_score": 7.0}).pipeline_score == 1.0  # type: ignore[union-attr]


def test_higher_score_ranks_first_and_near_ties_share_a_rank() -> None:
    ranks = rank_candidates(
        [
            Candidate("low", stats("low", 0.40)),
            Candidate("best", stats("best", 0.80)),
            Candidate("tie", stats("tie", 0.79)),
        ],
        tolerance=0.02,
        rng=random.Random(0),
    )
    assert sorted(ranks[0]) == ["best", "tie"] and ranks[1:] == [["low"]]
    firsts = {
        rank_candidates([Candidate("a", stats("a", 0.5)), Candidate("b", stats("b", 0.5))], 0.02, random.Random(seed))[
            0
        ][0]
        for seed in range(20)
    }
    assert firsts == {"a", "b"}  # a tie is not always won by the same replica


def test_zero_tolerance_gives_a_strict_order() -> None:
    candidates = [Candidate(f"r{i}", stats(f"r{i}", s)) for i, s in enumerate([0.5, 0.9, 0.7])]
    assert rank_candidates(candidates, 0.0, random.Random(0)) == [["r1"], ["r2"], ["r0"]]


def test_without_any_stats_it_is_power_of_two_choices() -> None:
    candidates = [Candidate(f"r{i}", None) for i in range(5)]
    seen = set()
    for seed in range(40):
        [rank] = rank_candidates(candidates, 0.02, random.Random(seed))
        assert len(rank) == 2 and len(set(rank)) == 2
        seen.update(rank)
    assert seen == {f"r{i}" for i in range(5)}  # random, not a fixed pair


def test_replicas_without_a_score_come_after_the_scored_ones() -> None:
    ranks = rank_candidates(
        [Candidate("new", None), Candidate("known", stats("known", 0.3)), Candidate("noreg", stats("noreg", None))],
        0.02,
        random.Random(1),
    )
    assert ranks[0] == ["known"] and sorted(ranks[1]) == ["new", "noreg"]


def test_power_of_two_with_few_replicas() -> None:
    assert power_of_two([], random.Random(0)) == []
    assert power_of_two(["a"], random.Random(0)) == ["a"]
    assert sorted(power_of_two(["a", "b"], random.Random(0))) == ["a", "b"]


def record(node: str, reputation: float, served: int = 0, failed: int = 0, latency: float | None = None) -> NodeRecord:
    return NodeRecord(
        node_id=node,
        wallet="w-" + node,
        reputation=reputation,
        requests_served=served,
        failures=failed,
        latency_ewma_s=latency,
    )


def test_a_failed_audit_lowers_the_pipeline_score_below_a_healthy_one() -> None:
    good = {"a": record("a", 0.5), "b": record("b", 0.5)}
    bad = dict(good, b=replace(good["b"], reputation=0.25))  # one failed audit: 0.5 -> 0.25
    healthy, faulty = score_of(["a", "b"], good, WEIGHTS, 0, 0.5), score_of(["a", "b"], bad, WEIGHTS, 0, 0.5)
    assert healthy - faulty == pytest.approx(2.0 * 0.25 / 5.0)  # reputation weight 2 of 5
    assert healthy - faulty > WEIGHTS.score_tolerance


def test_load_latency_and_failures_lower_the_score() -> None:
    base = {"a": record("a", 0.5, served=10, latency=0.1)}
    score = score_of(["a"], base, WEIGHTS, 0, 0.5)
    assert score_of(["a"], base, WEIGHTS, 4, 0.5) < score
    assert score_of(["a"], {"a": replace(base["a"], latency_ewma_s=2.0)}, WEIGHTS, 0, 0.5) < score
    assert score_of(["a"], {"a": replace(base["a"], failures=10)}, WEIGHTS, 0, 0.5) < score


def test_unregistered_nodes_count_as_fresh_nodes() -> None:
    fresh = score_of(["operator-node"], {}, WEIGHTS, 0, 0.5)
    assert fresh == score_of(["x"], {"x": record("x", 0.5)}, WEIGHTS, 0, 0.5)


class _ReplicaId:
    def __init__(self, unique_id: str) -> None:
        self.unique_id = unique_id


class _Replica:
    """Stands in for Serve's RunningReplica: its id and its last routing stats."""

    def __init__(self, unique_id: str, routing_stats: dict) -> None:
        self.replica_id = _ReplicaId(unique_id)
        self.routing_stats = routing_stats


def test_the_router_ranks_serve_replicas_by_their_reported_stats() -> None:
    import asyncio

    from serve_apps.routing.router import ReputationRouter

    router = object.__new__(ReputationRouter)  # the ranking needs no Serve internals
    router.initialize_state(score_tolerance=0.02, seed=0)
    good, bad = _Replica("good", stats("good", 0.6).to_dict()), _Replica("bad", stats("bad", 0.5).to_dict())
    ranks = asyncio.run(router.choose_replicas([bad, good], None))  # type: ignore[list-item]
    assert ranks == [[good], [bad]]


def test_a_choice_goes_to_the_request_it_was_made_for_and_else_to_the_oldest_waiting() -> None:
    """A replica ranked for one request must not serve an older one (plain FIFO did); a choice whose
    request is gone still serves the oldest (no routing spin)."""
    import asyncio
    from collections import deque
    from types import SimpleNamespace

    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from serve_apps.routing.router import ReputationRouter

    async def scenario() -> tuple[object, object, object]:
        router = object.__new__(ReputationRouter)
        router.queue_wait_time_ms_histogram = SimpleNamespace(observe=lambda _ms: None)  # type: ignore[attr-defined]
        first, chosen, later = (PendingRequest([], {}, RequestMetadata(f"r{i}", f"i{i}")) for i in range(3))
        router._pending_requests_to_fulfill = deque([first, chosen, later])
        router._pending_requests_by_id = {p.metadata.internal_request_id: p for p in (first, chosen, later)}
        router._fulfill_next_pending_request("bad", chosen.metadata)  # type: ignore[arg-type]
        assert not first.future.done() and chosen.future.result() == "bad"
        router._fulfill_next_pending_request("good", chosen.metadata)  # type: ignore[arg-type]  # chosen served
        return first.future.result(), chosen.future.result(), later.future.done()

    assert asyncio.run(scenario()) == ("good", "bad", False)
