"""The named detached payments actor under Ray: concurrent requests, a process kill in the middle of
a settlement (the actor is restarted by Ray and recovers), a second kill, and error translation."""

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import ray
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.transaction import Transaction

from cluster.config.payments import PaymentsSection
from payments.chain.tx import AssetSpec
from payments.client import PaymentsClient, PaymentsUnavailable, start_payments_actor
from payments.deposits import deposit_instruction
from payments.errors import Forbidden, InsufficientBalance
from payments.protocol import DepositRequest, HoldRequest, ProviderShare, ReceiptQuery, UsageReport
from payments.settlement import CRASH_POINTS, KillProcessAt

T = TypeVar("T")


async def deposit(client: PaymentsClient, payer: Keypair, amount: int) -> None:
    info = await client.deposit_info()
    await client.faucet(str(payer.pubkey()), amount)
    asset = AssetSpec(Pubkey.from_string(info.mint), info.decimals)
    ix = deposit_instruction(payer.pubkey(), Pubkey.from_string(info.treasury), asset, amount)
    blockhash = Hash.from_string(info.blockhash)
    tx = Transaction([payer], Message.new_with_blockhash([ix], payer.pubkey(), blockhash), blockhash)
    signature = await client.submit_transaction(bytes(tx))
    assert (await client.deposit(DepositRequest(signature))).amount == amount


async def one_request(client: PaymentsClient, rid: str, payer: str, providers: list[str]) -> Any:
    await client.place_hold(HoldRequest(rid, payer, "m", max_tokens=64, prompt_tokens=32))
    return await client.report_usage(
        UsageReport(
            rid,
            payer,
            "m",
            32,
            40,
            (ProviderShare(providers[0], 20), ProviderShare(providers[1], 10)),
        )
    )


async def when_available(call: Callable[[], Awaitable[T]], timeout_s: float = 90.0) -> T:
    """Retry an idempotent call while the actor restarts (the kill is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await call()
        except PaymentsUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def test_actor_survives_kills_mid_settlement_and_pays_once(ray_cluster: None, tmp_path: Path) -> None:
    section = PaymentsSection(
        state_dir=tmp_path / "state",
        actor_name=f"payments-{uuid.uuid4().hex[:8]}",
        actor_call_timeout_s=60.0,
    )
    handle = start_payments_actor(
        section,
        settle_loop=False,
        crash_hook=KillProcessAt("after_send", str(tmp_path / "killed-once")),
    )
    client = PaymentsClient(handle, section.actor_call_timeout_s)

    async def scenario() -> None:
        payer, stranger = Keypair(), Keypair()
        await deposit(client, payer, 200_000)
        providers = [str(Keypair().pubkey()) for _ in range(8)]
        records = await asyncio.gather(
            *(
                one_request(client, f"r{i}", str(payer.pubkey()), [providers[i % 8], providers[(i + 1) % 8]])
                for i in range(24)
            )
        )
        earned: dict[str, int] = defaultdict(int)
        for record in records:
            for share in record.shares:
                if share.role == "provider":
                    earned[share.wallet] += share.amount
        with pytest.raises(InsufficientBalance):
            await client.place_hold(HoldRequest("too-big", str(payer.pubkey()), "m", max_tokens=10**9))
        with pytest.raises(Forbidden):
            await client.get_receipt(ReceiptQuery(records[0].settlement_id, str(stranger.pubkey())))

        with pytest.raises(PaymentsUnavailable):
            await client.settle()  # the actor process is killed right after sending the batch
        assert (tmp_path / "killed-once").exists()
        # Ray restarts it; on start it recovers the open batch from the ledger and the chain
        await when_available(client.settle)
        for wallet in earned:
            assert (await client.balance(wallet)).unpaid_earnings == 0
        report = await client.reconcile()
        assert report.ok, report.checks
        assert report.details["paid_out"] == sum(earned.values())

        ray.kill(handle, no_restart=False)  # a second, plain kill: balances survive on disk
        await asyncio.sleep(1.0)
        again = await when_available(client.reconcile)
        assert again.ok and again.details["paid_out"] == sum(earned.values())
        receipt = await client.get_receipt(ReceiptQuery(records[0].settlement_id, records[0].payer))
        assert receipt.settled and receipt.signatures

        # train_jobs' reward sink calls the actor by method name with plain dicts
        trainer = str(Keypair().pubkey())
        reward = {
            "job": "fl",
            "round": 1,
            "wallet": trainer,
            "examples": 3,
            "amount_lamports": 3_000,
            "dropped": False,
        }
        dropped = {
            **reward,
            "wallet": str(Keypair().pubkey()),
            "dropped": True,
            "amount_lamports": 0,
        }
        await handle.fund_training_rewards.remote("ops-1", 3_000)
        ids = await handle.record_training_rewards.remote([reward, dropped])
        assert len(ids) == 1 and (await client.balance(trainer)).unpaid_earnings == 3_000

    try:
        asyncio.run(scenario())
    finally:
        ray.kill(handle, no_restart=True)


@pytest.mark.parametrize("point", [p for p in CRASH_POINTS if p != "after_send"])
def test_actor_process_killed_at_each_settlement_step_recovers(ray_cluster: None, tmp_path: Path, point: str) -> None:
    section = PaymentsSection(
        state_dir=tmp_path / "state",
        actor_name=f"payments-{uuid.uuid4().hex[:8]}",
        actor_call_timeout_s=60.0,
    )
    marker = tmp_path / "killed-once"
    handle = start_payments_actor(section, settle_loop=False, crash_hook=KillProcessAt(point, str(marker)))
    client = PaymentsClient(handle, section.actor_call_timeout_s)

    async def scenario() -> None:
        payer = Keypair()
        await deposit(client, payer, 50_000)
        providers = [str(Keypair().pubkey()) for _ in range(3)]
        records = [
            await one_request(client, f"r{i}", str(payer.pubkey()), [providers[i % 3], providers[(i + 1) % 3]])
            for i in range(4)
        ]
        earned = sum(s.amount for r in records for s in r.shares if s.role == "provider")
        with pytest.raises(PaymentsUnavailable):
            await client.settle()
        assert marker.read_text() == point
        await when_available(client.settle)
        report = await client.reconcile()
        assert report.ok, report.checks
        assert report.details["paid_out"] == earned and report.details["unpaid"] == 0

    try:
        asyncio.run(scenario())
    finally:
        ray.kill(handle, no_restart=True)
