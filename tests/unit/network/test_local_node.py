"""The operator's own node: the local wallet in the state dir, the head's proved record, left out of planning."""

import stat
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair

from cluster.config.network import NetworkSection
from cluster.network.local_node import is_operator_record, local_wallet, local_wallet_path
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.registry import HEAD_NODE_RESOURCE, NetworkRegistry
from cluster.network.wallet import JoinProof, ProofError, sign_challenge


def head(node_id: str = "head", alive: bool = True, head_node: bool = True) -> dict[str, Any]:
    resources: dict[str, float] = {"CPU": 2.0, "GPU": 0.0, "memory": 4 * 2**30}
    if head_node:
        resources[HEAD_NODE_RESOURCE] = 1.0
    return {"NodeID": node_id, "Alive": alive, "Resources": resources, "Labels": {"ray.io/node-id": node_id}}


def register(registry: NetworkRegistry, keypair: Keypair, node: dict[str, Any], now: float = 0.0) -> NodeRecord:
    proof = sign_challenge(keypair, registry.issue_challenge(node["NodeID"], str(keypair.pubkey()), now))
    return registry.register_operator(proof, NodeCapabilities(throughput_gflops=50.0), node, now)


def test_local_wallet_is_generated_once_and_private(tmp_path: Path) -> None:
    first = local_wallet(tmp_path / "state")
    assert stat.S_IMODE(local_wallet_path(tmp_path / "state").stat().st_mode) == 0o600
    assert local_wallet(tmp_path / "state").pubkey() == first.pubkey()


def test_head_registers_as_the_operators_node_with_its_hardware() -> None:
    registry, keypair = NetworkRegistry(NetworkSection()), Keypair()
    record = register(registry, keypair, head())
    assert record.wallet == str(keypair.pubkey()) and record.verified and record.health == "alive"
    assert (record.capabilities.num_cpus, record.capabilities.memory_bytes) == (2.0, 4 * 2**30)
    assert record.capabilities.throughput_gflops == 50.0
    assert record.labels["solanalm.io/hardware"] == "cpu" and is_operator_record(record, "solanalm.io")
    assert [r.node_id for r in registry.list_nodes()] == ["head"]


def test_only_the_live_head_and_a_valid_signature_are_accepted() -> None:
    registry, keypair = NetworkRegistry(NetworkSection()), Keypair()
    with pytest.raises(ProofError, match="not the head"):
        register(registry, keypair, head("worker", head_node=False))
    with pytest.raises(ProofError, match="not a live"):
        register(registry, keypair, head(alive=False))
    challenge = registry.issue_challenge("head", str(keypair.pubkey()), 0.0)
    forged = JoinProof(challenge=challenge, signature=str(Keypair().sign_message(challenge.message())))
    with pytest.raises(ProofError, match="does not verify"):
        registry.register_operator(forged, NodeCapabilities(), head(), 0.0)
    assert registry.list_nodes() == []


def test_re_registration_keeps_counters_and_join_time() -> None:
    registry, keypair = NetworkRegistry(NetworkSection()), Keypair()
    register(registry, keypair, head(), now=10.0)
    registry.record_request(["head"], True, 0.2)
    again = register(registry, keypair, head(), now=99.0)
    assert (again.joined_at, again.requests_served) == (10.0, 1)


def test_a_provider_node_is_not_an_operator_record() -> None:
    record = NodeRecord("n1", "w", labels={"solanalm.io/wallet": "w"})
    assert not is_operator_record(record, "solanalm.io")


def test_placement_plans_without_the_operators_record(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster import deploy
    from cluster.config import Settings
    from cluster.network import registry as registry_module

    operator = NodeRecord("head", "w", labels={"solanalm.io/operator": "true"})
    provider = NodeRecord("n1", "p", labels={"solanalm.io/wallet": "p"})
    monkeypatch.setattr(registry_module, "get_registry", lambda *_: object())
    monkeypatch.setattr(registry_module, "call_registry", lambda *_a, **_k: [operator, provider])
    assert deploy.registry_records(Settings()) == [provider]
