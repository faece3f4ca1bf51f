"""Federated rewards under attack: a real Flower simulation (tiny Llama, 4 clients, 2 rounds) whose
reward sink is a real payments actor (LiteSVM), with clients that lie (fl_attack_run.py):
(a) one reports 10x the examples of its partition, (b) two name wallets they hold no key for,
(c) the rounds want more than the job's per-round budget, (d) the rewards account is funded for one
round only, so the second round's batch must be refused whole and the ledger still reconcile.
"""

import asyncio
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from solders.keypair import Keypair

from cluster.config.payments import PaymentsSection
from payments.client import PaymentsClient, start_payments_actor

pytestmark = pytest.mark.usefixtures("ray_cluster")

RATE = 1_000  # training.reward_lamports_per_example
BUDGET = 10_000  # job.reward_budget_per_round_lamports
FUNDING = 15_000  # the rewards account: round 1 (10,000) fits, round 2 (another 10,000) does not
PARTITION = 10  # 44 examples, 4 held out, 40 over 4 clients; 2 steps of 5 cover a partition once


@dataclass(frozen=True)
class Run:
    summary: dict[str, Any]
    roles: dict[str, dict[str, str]]
    victims: list[str]
    pending: list[dict[str, Any]]
    handle: Any
    client: PaymentsClient

    def unpaid(self, wallet: str) -> int:
        return asyncio.run(self.client.balance(wallet)).unpaid_earnings


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, model_cache_dir: Path, repo_root: Path) -> Any:
    tmp = tmp_path_factory.mktemp("fl-attack")
    section = PaymentsSection(
        state_dir=tmp / "payments", actor_name=f"payments-fl-{uuid.uuid4().hex[:8]}", actor_call_timeout_s=60.0
    )
    handle = start_payments_actor(section, namespace="solanalm-test", settle_loop=False)
    client = PaymentsClient(handle, section.actor_call_timeout_s)
    treasury = asyncio.run(client.deposit_info()).treasury
    ray.get(handle.fund_training_rewards.remote("test-funding-1", FUNDING), timeout=60)
    asyncio.run(client.faucet(treasury, FUNDING))  # the operator sends the rewards money on chain
    job = {
        "name": "fl-attack",
        "model": {
            "name": "tiny-llama",
            "catalogue": str(repo_root / "configs/models.yaml"),
            "cache_dir": str(model_cache_dir),
        },
        "data": {"max_length": 24, "max_examples": 44},
        "optim": {"learning_rate": 1e-2, "batch_size": 5, "max_steps": 2},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "num_clients": 4,
        "num_rounds": 2,
        "min_train_clients": 4,
        "min_available_clients": 4,
        "client_resources": {"num_cpus": 4, "torch_threads": 1},
        "reward_budget_per_round_lamports": BUDGET,
        "storage_path": str(tmp),
    }
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    settings = tmp / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "ray": {"namespace": "solanalm-test"},
                "training": {
                    "reward_sink": "actor",
                    "rewards_actor_name": section.actor_name,
                    "reward_lamports_per_example": RATE,
                },
            }
        )
    )
    victims = [str(Keypair().pubkey()), str(Keypair().pubkey())]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.attacks.fl_attack_run",
            "--config",
            str(config),
            "--settings",
            str(settings),
            "--ray-address",
            ray.get_runtime_context().gcs_address,
            "--victims",
            ",".join(victims),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=repo_root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp / "fl-attack"
    roles = {}
    for path in (out / "roles").glob("*.json"):
        claim = json.loads(path.read_text())
        roles[claim["role"]] = claim
    pending_file = out / "rewards.pending.jsonl"
    pending = [json.loads(line) for line in pending_file.read_text().splitlines()] if pending_file.exists() else []
    try:
        yield Run(json.loads((out / "summary.json").read_text()), roles, victims, pending, handle, client)
    finally:
        ray.kill(handle, no_restart=True)


def test_a_client_inflating_its_example_count_is_paid_for_its_partition_only(run: Run) -> None:
    honest, inflater = run.roles["honest"]["own_wallet"], run.roles["inflater"]["own_wallet"]
    assert run.unpaid(inflater) == run.unpaid(honest) > 0
    first = run.summary["rounds"][0]
    assert first["reported_examples"][inflater] == 10 * PARTITION
    assert first["examples"][inflater] == first["examples"][honest] == PARTITION


def test_a_client_naming_a_wallet_it_cannot_sign_for_earns_nothing(run: Run) -> None:
    for wallet in run.victims:
        assert run.unpaid(wallet) == 0
    for role in ("forger", "unsigned"):
        assert run.unpaid(run.roles[role]["own_wallet"]) == 0
    unproven = {claim["claimed_wallet"] for claim in run.summary["unproven"]}
    assert unproven == set(run.victims)
    assert not any(reward["wallet"] in run.victims for reward in run.pending)


def test_a_round_pays_at_most_its_budget(run: Run) -> None:
    figures = asyncio.run(run.client.reconcile()).details
    assert figures["rewards"] <= BUDGET * len(run.summary["rounds"])
    for stats in run.summary["rounds"]:  # honest 10 + inflater 10 credited: 20,000 wanted, scaled to 10,000
        assert sum(stats["rewards_lamports"].values()) == BUDGET


def test_a_reward_batch_beyond_the_funding_is_refused_whole_and_the_ledger_reconciles(run: Run) -> None:
    # Round 1 took 10,000 of the 15,000; round 2's 10,000 was refused and kept in the pending file.
    assert {reward["round"] for reward in run.pending} == {2}
    assert sum(reward["amount_lamports"] for reward in run.pending) == BUDGET
    report = asyncio.run(run.client.reconcile())
    assert report.ok, report.checks
    assert report.details["rewards"] == BUDGET
    # The same refusal through the actor directly: 5,001 against 5,000 left; nothing of it is recorded.
    wallets = [str(Keypair().pubkey()) for _ in range(2)]
    batch = [
        {"job": "fl-direct", "round": 1, "wallet": wallets[0], "examples": 1, "amount_lamports": 2_500},
        {"job": "fl-direct", "round": 1, "wallet": wallets[1], "examples": 1, "amount_lamports": 2_501},
    ]
    with pytest.raises(ray.exceptions.RayTaskError, match="rewards account"):
        ray.get(run.handle.record_training_rewards.remote(batch), timeout=60)
    assert [run.unpaid(w) for w in wallets] == [0, 0]
    after = asyncio.run(run.client.reconcile())
    assert after.ok and after.details["rewards"] == BUDGET
    batch[1]["amount_lamports"] = 2_500
    assert len(ray.get(run.handle.record_training_rewards.remote(batch), timeout=60)) == 2
