"""The pure registry: proof-checked registration, health from Ray's node table, counters, reputation."""

from typing import Any

import pytest
from solders.keypair import Keypair

from cluster.config.network import NetworkSection
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.registry import NetworkRegistry
from cluster.network.reputation import pipeline_score
from cluster.network.wallet import ProofError, sign_challenge


def ray_node(node_id: str, wallet: str, alive: bool = True, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "NodeID": node_id,
        "Alive": alive,
        "Resources": {"CPU": 4.0, "memory": 8 * 2**30},
        "Labels": {"ray.io/node-id": node_id, "solanalm.io/wallet": wallet, **(labels or {})},
    }


def join(registry: NetworkRegistry, node_id: str, keypair: Keypair, labels: dict[str, str] | None = None) -> NodeRecord:
    wallet = str(keypair.pubkey())
    proof = sign_challenge(keypair, registry.issue_challenge(node_id, wallet, 0.0))
    node = ray_node(node_id, wallet, labels=labels)
    return registry.register(proof, NodeCapabilities(throughput_gflops=10.0), node, 0.0)


def test_register_takes_resources_and_labels_from_ray() -> None:
    registry = NetworkRegistry(NetworkSection())
    record = join(registry, "n1", Keypair(), {"solanalm.io/region": "eu-west"})
    caps = record.capabilities
    assert (record.region, caps.num_cpus, caps.memory_bytes) == ("eu-west", 4.0, 8 * 2**30)
    assert record.capabilities.throughput_gflops == 10.0 and "ray.io/node-id" not in record.labels
    assert [r.node_id for r in registry.eligible_nodes()] == ["n1"]


def test_node_must_carry_the_proving_wallet() -> None:
    registry, keypair = NetworkRegistry(NetworkSection()), Keypair()
    proof = sign_challenge(keypair, registry.issue_challenge("n1", str(keypair.pubkey()), 0.0))
    with pytest.raises(ProofError, match="not labelled"):
        registry.register(proof, NodeCapabilities(), ray_node("n1", str(Keypair().pubkey())), 1.0)
    assert registry.list_nodes() == []


def test_dead_node_and_mismatched_labels_are_rejected() -> None:
    registry, keypair = NetworkRegistry(NetworkSection()), Keypair()
    wallet = str(keypair.pubkey())
    proof = sign_challenge(keypair, registry.issue_challenge("n1", wallet, 0.0))
    with pytest.raises(ProofError, match="not a live"):
        registry.register(proof, NodeCapabilities(), ray_node("n1", wallet, alive=False), 1.0)
    proof = sign_challenge(keypair, registry.issue_challenge("n1", wallet, 0.0))
    with pytest.raises(ProofError, match="declared label"):
        registry.register(proof, NodeCapabilities(), ray_node("n1", wallet), 1.0, labels={"solanalm.io/region": "x"})


def test_health_follows_ray_and_draining() -> None:
    registry, keypair = NetworkRegistry(NetworkSection()), Keypair()
    join(registry, "n1", keypair)
    join(registry, "n2", keypair)
    registry.set_draining("n2")
    assert registry.sync_health([ray_node("n1", "w", alive=False), ray_node("n2", "w")]) == ["n1"]
    assert [(r.node_id, r.health) for r in registry.list_nodes()] == [("n1", "dead"), ("n2", "draining")]
    assert registry.eligible_nodes() == []
    registry.set_draining("n2", False)
    assert [r.node_id for r in registry.eligible_nodes()] == ["n2"]


def test_requests_update_counters_ewma_and_reputation() -> None:
    registry = NetworkRegistry(NetworkSection())
    join(registry, "n1", Keypair())
    assert registry.record_request(["n1", "ghost"], True, 1.0) == ["ghost"]
    registry.record_request(["n1"], True, [2.0])
    registry.record_request(["n1"], False, 9.0)
    record = registry.records["n1"]
    assert (record.requests_served, record.failures) == (2, 1)
    assert record.latency_ewma_s == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)  # failures do not move latency
    assert record.reputation == pytest.approx((0.5 + 0.01 * 0.5 + 0.01 * (1 - 0.505)) * 0.95)
    assert record.success_rate == pytest.approx(3 / 5)


def test_failed_audits_make_a_node_ineligible_and_stick_to_its_wallet() -> None:
    registry, keypair = NetworkRegistry(NetworkSection()), Keypair()
    join(registry, "n1", keypair)
    registry.record_verification(["n1"], passed=False)
    registry.record_verification(["n1"], passed=False)
    assert registry.records["n1"].reputation == pytest.approx(0.125)
    assert registry.eligible_nodes() == []
    # Re-joining with a new node does not wash the wallet clean.
    assert join(registry, "n2", keypair).reputation == pytest.approx(0.125)
    assert join(registry, "n3", Keypair()).reputation == 0.5


def test_scores_prefer_reliable_fast_nodes() -> None:
    registry = NetworkRegistry(NetworkSection())
    join(registry, "good", Keypair())
    join(registry, "bad", Keypair())
    for _ in range(5):
        registry.record_request(["good"], True, 0.1)
        registry.record_request(["bad"], False, 0.0)
    scores = registry.scores()
    assert scores["good"] > scores["bad"]
    records = registry.records
    weights = NetworkSection().routing
    assert pipeline_score([records["good"], records["bad"]], weights) < pipeline_score([records["good"]], weights)
    assert pipeline_score([records["good"]], weights, queued=10) < pipeline_score([records["good"]], weights)


def test_records_round_trip_json_and_dirty_tracking() -> None:
    registry = NetworkRegistry(NetworkSection())
    join(registry, "n1", Keypair(), {"solanalm.io/region": "us"})
    registry.record_request(["n1"], True, 0.5)
    dirty = registry.take_dirty()
    assert [r.node_id for r in dirty] == ["n1"] and registry.take_dirty() == []
    assert NodeRecord.from_json(dirty[0].to_json()) == dirty[0]
