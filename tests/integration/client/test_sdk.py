"""The Python SDK against a real paid gateway (Ray Serve, payments actor on LiteSVM, tiny Llama): sign in from
a keypair file, deposit by relay, inference sync/async/stream with the settlement id, receipts, balance, keys,
payouts after a settle pass, errors; and the paid demo's flow (payments.demo.run_paid_demo)."""

import asyncio
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from solanalm_client import (
    AsyncSolanaLMClient,
    AuthenticationError,
    InsufficientBalance,
    KeypairError,
    NotFound,
    PermissionDenied,
    SolanaLMClient,
)
from solders.keypair import Keypair

from payments.demo import print_report, run_paid_demo, write_keypair_file
from tests.integration.attacks.conftest import MODEL
from tests.integration.client.conftest import SdkDeployment

DEPOSIT = 50_000_000


def funded(sdk: SdkDeployment, tmp_path: Path, amount: int = DEPOSIT) -> tuple[SolanaLMClient, Path]:
    """A client signed in from a Solana CLI keypair file, funded by the faucet, with `amount` deposited."""
    path = write_keypair_file(Keypair(), tmp_path / f"wallet-{len(list(tmp_path.iterdir()))}.json")
    client = SolanaLMClient(sdk.url, model=MODEL)
    key = client.sign_in(path)
    assert key.wallet == client.wallet and key.secret.startswith("slm_")
    asyncio.run(sdk.app.payments().faucet(key.wallet, amount))
    deposit = client.deposit(amount)
    assert (deposit.wallet, deposit.amount, deposit.newly_credited) == (key.wallet, amount, True)
    return client, path


def test_sync_inference_and_stream_are_paid_with_readable_receipts(sdk_paid: SdkDeployment, tmp_path: Path) -> None:
    client, _ = funded(sdk_paid, tmp_path)
    with client:
        before = client.balance()
        assert (before.available, before.held) == (DEPOSIT, 0)
        answer = client.inference("Hello", max_tokens=5)
        assert answer.settlement_id and answer.usage is not None and answer.usage.completion_tokens == 5
        receipt = client.receipt(answer.settlement_id)
        assert receipt.payer == client.wallet and receipt.completion_tokens == 5
        assert receipt.provider_shares.keys() == {str(sdk_paid.provider.pubkey())}
        assert sum(s.amount for s in receipt.shares) == receipt.cost
        assert receipt.commission == receipt.cost - sum(receipt.provider_shares.values())
        assert client.balance().available == DEPOSIT - receipt.cost

        stream = client.stream("Tell me a story", max_tokens=4)
        parts = list(stream)
        result = stream.result
        assert result.settlement_id and result.settlement_id != answer.settlement_id
        assert "".join(parts) == result.text and result.finish_reason == "length"
        assert client.receipt(result.settlement_id).completion_tokens == 4


def test_the_async_client_signs_in_pays_and_streams(sdk_paid: SdkDeployment, tmp_path: Path) -> None:
    _, path = funded(sdk_paid, tmp_path)

    async def scenario() -> None:
        async with AsyncSolanaLMClient(sdk_paid.url) as client:  # no model given: the served one
            await client.sign_in(path)  # a second key for the same wallet
            answer = await client.inference(messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
            assert answer.model == MODEL and answer.settlement_id
            assert (await client.receipt(answer.settlement_id)).payer == client.wallet
            stream = await client.stream("Hi", max_tokens=3)
            assert [part async for part in stream]
            assert (await stream.result()).settlement_id
            keys = await client.list_keys()
            assert len(keys) == 2 and all(k.wallet == client.wallet and k.active for k in keys)

    asyncio.run(scenario())


def test_keys_are_listed_and_a_revoked_key_stops_working(sdk_paid: SdkDeployment, tmp_path: Path) -> None:
    path = write_keypair_file(Keypair(), tmp_path / "id.json")
    with SolanaLMClient(sdk_paid.url) as first, SolanaLMClient(sdk_paid.url) as second:
        one, two = first.sign_in(path), second.sign_in(path)
        assert {k.id for k in first.list_keys()} == {one.id, two.id}
        assert second.revoke_key(one.id) is True
        with pytest.raises(AuthenticationError) as caught:
            first.balance()
        assert caught.value.status == 401
        listed = {k.id: k for k in second.list_keys()}
        assert listed[one.id].revoked_at is not None and listed[two.id].active


def test_a_provider_sees_its_earnings_paid_out_after_a_settle_pass(sdk_paid: SdkDeployment, tmp_path: Path) -> None:
    client, _ = funded(sdk_paid, tmp_path)
    with client, SolanaLMClient(sdk_paid.url) as provider:
        answer = client.inference("Pay my provider", max_tokens=3)
        provider.sign_in(sdk_paid.provider)
        owed = provider.receipt(answer.settlement_id).provider_shares[provider.wallet or ""]  # a payee reads it
        before = provider.earnings()
        assert before.unpaid >= owed > 0
        report = asyncio.run(sdk_paid.app.payments().settle())
        assert report.payouts_confirmed >= 1
        after = provider.earnings()
        assert after.unpaid == 0 and after.paid == before.paid + before.unpaid
        newest = provider.payouts()[0]
        assert newest.confirmed and newest.signature and newest.amount == before.unpaid
        settled = client.receipt(answer.settlement_id)
        assert settled.settled and newest.signature in settled.signatures


def test_errors_are_typed_never_tracebacks(sdk_paid: SdkDeployment, tmp_path: Path) -> None:
    from solanalm_client import cli

    unfunded = write_keypair_file(Keypair(), tmp_path / "poor.json")
    with SolanaLMClient(sdk_paid.url, model=MODEL) as poor, SolanaLMClient(sdk_paid.url) as stranger:
        poor.sign_in(unfunded)
        with pytest.raises(InsufficientBalance) as caught:
            poor.inference("Hello", max_tokens=5)
        assert caught.value.status == 402 and caught.value.code
        with pytest.raises(NotFound):
            poor.receipt("set_doesnotexist")
        rich, _ = funded(sdk_paid, tmp_path)
        with rich:
            answer = rich.inference("Hello", max_tokens=2)
        stranger.sign_in(Keypair())
        with pytest.raises(PermissionDenied):
            stranger.receipt(answer.settlement_id or "")
    with pytest.raises(KeypairError):
        SolanaLMClient(sdk_paid.url).sign_in(tmp_path / "missing.json")
    garbled = tmp_path / "garbled.json"
    garbled.write_text(json.dumps([7] * 12))
    assert cli.run(["--url", sdk_paid.url, "--keypair", str(garbled), "balance"]) == 2
    assert cli.run(["--url", sdk_paid.url, "--keypair", str(unfunded), "chat", "Hi", "--model", MODEL]) == 2


def test_the_paid_demo_shows_deposit_receipt_payout_and_provider_balance(
    sdk_paid: SdkDeployment, tmp_path: Path
) -> None:
    report = asyncio.run(
        run_paid_demo(sdk_paid.url, sdk_paid.app.payments(), sdk_paid.provider, tmp_path, deposit=DEPOSIT, max_tokens=4)
    )
    assert report.deposit.amount == DEPOSIT and report.balance_before.available == DEPOSIT
    assert report.balance_after.available == DEPOSIT - report.receipt.cost
    assert report.receipt.provider_shares.keys() == {report.provider_wallet} and report.receipt.commission > 0
    assert report.receipt_after.settled and report.receipt_after.signatures
    assert report.provider_earnings_after.unpaid == 0
    paid_now = report.provider_earnings_after.paid - report.provider_earnings_before.paid
    assert paid_now == report.provider_earnings_before.unpaid > 0
    out = Console(record=True, width=400, file=io.StringIO())
    print_report(report, out)
    printed = out.export_text()
    assert report.answer.settlement_id in printed and report.receipt_after.signatures[0] in printed
