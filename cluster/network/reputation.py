"""The reputation rule and the routing score: pure functions over NodeRecord and settings.

Every update moves reputation a fixed fraction of the way to a bound: towards 1 on success
(`r + step * (1 - r)`), towards 0 on failure (`r - step * r`). So reputation stays in [0, 1], good news
has diminishing returns near 1, and one failed audit (default step 0.5) takes a node from 0.5 to
0.25, which ~40 served requests (default success step 0.01) earn back.
"""

import math
from collections.abc import Iterable
from dataclasses import replace

from cluster.config.network import ReputationSection, RoutingWeights
from cluster.network.records import NodeRecord


def towards_one(value: float, step: float) -> float:
    return value + step * (1.0 - value)


def towards_zero(value: float, step: float) -> float:
    return value - step * value


def after_request(record: NodeRecord, ok: bool, latency_s: float, rule: ReputationSection) -> NodeRecord:
    """Counters, latency EWMA (successful requests only) and reputation after one request."""
    if not ok:
        return replace(
            record, failures=record.failures + 1, reputation=towards_zero(record.reputation, rule.failure_step)
        )
    ewma = record.latency_ewma_s
    latency = max(0.0, latency_s)
    ewma = latency if ewma is None else (1 - rule.latency_ewma_alpha) * ewma + rule.latency_ewma_alpha * latency
    return replace(
        record,
        requests_served=record.requests_served + 1,
        latency_ewma_s=ewma,
        reputation=towards_one(record.reputation, rule.success_step),
    )


def after_verification(record: NodeRecord, passed: bool, rule: ReputationSection) -> NodeRecord:
    """Counters and reputation after one audit of work this node served."""
    if passed:
        return replace(
            record,
            verifications_passed=record.verifications_passed + 1,
            reputation=towards_one(record.reputation, rule.verification_pass_step),
        )
    return replace(
        record,
        verifications_failed=record.verifications_failed + 1,
        reputation=towards_zero(record.reputation, rule.verification_fail_step),
    )


def joining_reputation(wallet: str, known: Iterable[NodeRecord], rule: ReputationSection) -> float:
    """A new node starts at the initial reputation, or lower if its wallet's earlier nodes ended lower
    (leaving and re-joining does not wash a bad reputation clean)."""
    previous = [r.reputation for r in known if r.wallet == wallet and r.verified]
    return min([rule.initial, *previous])


def node_score(record: NodeRecord, weights: RoutingWeights, queued: int = 0) -> float:
    """Weighted mean in [0, 1] of success rate, latency, load and reputation (higher is better)."""
    return pipeline_score([record], weights, queued)


def pipeline_score(records: list[NodeRecord], weights: RoutingWeights, queued: int = 0) -> float:
    """Score of a pipeline over its stages' nodes: success rates multiply, latencies add, the least
    reputable node counts. `queued` is the replica's current load (requests waiting or running)."""
    if not records:
        return 0.0
    success = math.prod(r.success_rate for r in records)
    latency = sum(r.latency_ewma_s or 0.0 for r in records)
    terms = (
        (weights.success, success),
        (weights.latency, 1.0 / (1.0 + latency / weights.latency_reference_s)),
        (weights.load, 1.0 / (1.0 + max(0, queued))),
        (weights.reputation, min(r.reputation for r in records)),
    )
    total = sum(w for w, _ in terms)
    return sum(w * v for w, v in terms) / total if total > 0 else 0.0
