"""Federated reward wallets: generated keypairs, the registration proof, partitions and credited rewards."""

import stat
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import ConfigRecord
from solders.keypair import Keypair

from cluster.network.wallet import ProofError, write_keypair
from train_jobs.config import FederatedJob
from train_jobs.fl_client import challenge_from_record, challenge_to_record, client_keypair_for, client_wallet
from train_jobs.fl_server import (
    FederatedSummary,
    Registration,
    RewardingFedAvg,
    RoundStats,
    assign_partitions,
    check_claim,
)
from train_jobs.protocol import JsonlRewardSink
from train_jobs.wallets import (
    REWARD_PROOF_DOMAIN,
    RewardWalletChallenge,
    client_keypair,
    issue_challenge,
    sign_challenge,
    verify_claim,
)


def test_a_client_keypair_is_generated_once_owner_only(tmp_path: Path) -> None:
    first = client_keypair(tmp_path / "client-0")
    assert client_keypair(tmp_path / "client-0").pubkey() == first.pubkey()
    path = tmp_path / "client-0" / "reward-wallet.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "client-0").stat().st_mode) == 0o700
    assert client_keypair(tmp_path / "client-1").pubkey() != first.pubkey()
    assert [p.name for p in (tmp_path / "client-0").iterdir()] == ["reward-wallet.json"]  # no scratch left


def test_client_wallets_come_from_configured_keys_or_the_state_dir(tmp_path: Path) -> None:
    keys = [Keypair(), Keypair()]
    paths = [write_keypair(k, tmp_path / f"k{i}.json") for i, k in enumerate(keys)]
    named = FederatedJob(name="fl", num_clients=2, client_keypairs=paths)
    assert client_wallet(named, 1) == str(keys[1].pubkey())
    generated = FederatedJob(name="fl", num_clients=2, client_state_dir=tmp_path / "clients")
    wallets = [client_wallet(generated, c) for c in range(2)]
    assert len(set(wallets)) == 2 and wallets == [client_wallet(generated, c) for c in range(2)]
    assert (tmp_path / "clients" / "client-1" / "reward-wallet.json").exists()
    with pytest.raises(ValueError, match="client_state_dir"):
        client_keypair_for(FederatedJob(name="fl", num_clients=2), 0)


def test_the_signed_registration_names_its_domain_job_node_partition_and_wallet() -> None:
    challenge = issue_challenge("fl", 12345678901234567890, 3, now=100.0, ttl_s=60)
    keypair = Keypair()
    wallet, signature = sign_challenge(keypair, challenge)
    text = replace(challenge, wallet=wallet).message().decode()
    assert text.startswith(REWARD_PROOF_DOMAIN + "\n")
    for part in ("job: fl", "node: 12345678901234567890", "partition: 3", f"wallet: {wallet}", challenge.nonce):
        assert part in text
    assert str(verify_claim(challenge, wallet, signature, now=120.0)) == wallet
    assert issue_challenge("fl", 1, 0, 100.0, 60).nonce != challenge.nonce
    # what the server sends survives the record round trip (node ids are 64-bit)
    assert challenge_from_record(challenge_to_record(challenge)) == challenge


@pytest.mark.parametrize("attack", ["other_wallet", "no_signature", "garbage", "expired", "other_node", "bad_address"])
def test_a_claim_without_the_wallets_key_is_refused(attack: str) -> None:
    challenge = issue_challenge("fl", 7, 0, now=100.0, ttl_s=60)
    attacker, victim = Keypair(), str(Keypair().pubkey())
    wallet, signature = sign_challenge(attacker, challenge)
    claim: tuple[RewardWalletChallenge, str, str | None, float] = (challenge, wallet, signature, 120.0)
    if attack == "other_wallet":
        claim = (challenge, victim, signature, 120.0)
    elif attack == "no_signature":
        claim = (challenge, victim, None, 120.0)
    elif attack == "garbage":
        claim = (challenge, wallet, "not-a-signature", 120.0)
    elif attack == "expired":
        claim = (challenge, wallet, signature, 161.0)
    elif attack == "other_node":
        claim = (replace(challenge, node_id=8), wallet, signature, 120.0)
    elif attack == "bad_address":
        claim = (challenge, "unset", signature, 120.0)
    with pytest.raises(ProofError):
        verify_claim(*claim)


def test_check_claim_keeps_the_proven_wallet_and_says_why_otherwise() -> None:
    challenge = issue_challenge("fl", 7, 2, now=100.0, ttl_s=60)
    keypair = Keypair()
    wallet, signature = sign_challenge(keypair, challenge)
    node = Registration(7, 2)
    proven = check_claim(node, challenge, ConfigRecord({"wallet": wallet, "signature": signature}), 110.0)
    assert proven.wallet == wallet and proven.label == wallet and proven.partition == 2
    victim = str(Keypair().pubkey())
    forged = check_claim(node, challenge, ConfigRecord({"wallet": victim, "signature": signature}), 110.0)
    assert forged.wallet is None and forged.claimed_wallet == victim and "forged" in str(forged.unproven_reason)
    assert forged.label == "unproven-node-7"
    assert check_claim(node, challenge, None, 110.0).wallet is None


def test_partitions_are_assigned_by_the_server_one_per_node() -> None:
    assert assign_partitions([30, 10, 20], 3) == {10: 0, 20: 1, 30: 2}
    assert assign_partitions([30, 10, 20, 40], 3) == {10: 0, 20: 1, 30: 2}  # a fourth node gets none


def _strategy(tmp_path: Path, budget: int, registrations: dict[int, Registration]) -> RewardingFedAvg:
    job = FederatedJob(name="fl", num_clients=3, reward_budget_per_round_lamports=budget)
    sink = JsonlRewardSink(tmp_path / "r.jsonl")
    return RewardingFedAvg(job, registrations, sink, 100, FederatedSummary(job="fl"), sizes=[10, 10, 10])


def test_only_proven_wallets_are_rewarded_within_the_budget(tmp_path: Path) -> None:
    a, b = str(Keypair().pubkey()), str(Keypair().pubkey())
    registrations = {1: Registration(1, 0, a, a), 2: Registration(2, 1, b, b), 3: Registration(3, 2, None, "V")}
    strategy = _strategy(tmp_path, budget=1_500, registrations=registrations)
    strategy._selected[1] = [1, 2, 3]
    stats = RoundStats(
        1, [a, b, "unproven-node-3"], [], [], 0.0, {}, {a: 10, b: 5, "unproven-node-3": 10}, {}, {}, None
    )
    rewards = strategy._rewards(1, stats)
    assert {r.wallet for r in rewards} == {a, b}  # the unproven node's claimed wallet is not named
    assert {r.wallet: r.amount_lamports for r in rewards} == {a: 1_000, b: 500}  # 1,500 wanted: fits
    strategy.job = strategy.job.model_copy(update={"reward_budget_per_round_lamports": 300})
    scaled = {r.wallet: r.amount_lamports for r in strategy._rewards(1, stats)}
    assert scaled == {a: 200, b: 100} and sum(scaled.values()) <= 300


def test_the_server_credits_at_most_the_assigned_examples(tmp_path: Path) -> None:
    strategy = _strategy(tmp_path, budget=10**6, registrations={})
    # max_steps 20 x batch 8 = 160 >= partition 10: one pass over the partition is what a round assigns
    assert strategy._assigned(Registration(1, 0)) == 10
    assert strategy._assigned(Registration(1, 5)) == 0  # no such partition: nothing to credit
    short = strategy.job.model_copy(update={"optim": strategy.job.optim.model_copy(update={"max_steps": 1})})
    strategy.job = short
    assert strategy._assigned(Registration(1, 0)) == 8
