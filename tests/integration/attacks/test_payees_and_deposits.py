"""Payees and deposits under attack, against the real paid-mode deployment (payments actor on LiteSVM).

- usage reported (as the gateway reports it) with payee wallets that cannot be paid: `unset` from a
  Kubernetes label, `unregistered-node-3`, an off-curve address, a program id. Their shares go to the
  network, the payer pays the normal price, and settle passes keep paying the honest provider;
- a transfer signed by the treasury (a payout to the operator when the operator wallet is the
  treasury) submitted over HTTP as a deposit is refused with a 400 in OpenAI error format.
"""

import asyncio
import base64
import json
import uuid

import httpx
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.transaction import Transaction
from spl.token.constants import TOKEN_PROGRAM_ID

from payments.chain.tx import AssetSpec
from payments.deposits import deposit_instruction
from payments.protocol import HoldRequest, ProviderShare, UsageReport
from tests.integration.attacks.conftest import MODEL, PaidApp

BAD_PAYEES = (
    "unset",
    "unregistered-node-3",
    str(Pubkey.find_program_address([b"vault"], TOKEN_PROGRAM_ID)[0]),  # off curve
    str(TOKEN_PROGRAM_ID),
)


def test_bad_payees_are_paid_to_the_network_and_settling_keeps_paying_everyone_else(paid: PaidApp) -> None:
    wallet = paid.wallet()
    honest = str(Keypair().pubkey())
    payments = paid.payments()

    async def serve_and_settle() -> tuple[list, object, object, dict]:  # type: ignore[type-arg]
        records = []
        for bad in BAD_PAYEES:
            request_id = f"attack-{uuid.uuid4().hex[:8]}"
            await payments.place_hold(HoldRequest(request_id, wallet.address, MODEL, max_tokens=8, prompt_tokens=4))
            providers = (ProviderShare(honest, 10), ProviderShare(bad, 6))
            records.append(await payments.report_usage(UsageReport(request_id, wallet.address, MODEL, 4, 8, providers)))
        first = await payments.settle()
        second = await payments.settle()
        return records, first, second, await payments.pending()

    before = paid.balance(wallet)
    records, first, second, pending = asyncio.run(serve_and_settle())
    cost = 4 * 1_000 + 8 * 2_000  # the fixture's prices per token
    assert all(r.cost == cost for r in records)
    assert before["available"] - paid.balance(wallet)["available"] == cost * len(BAD_PAYEES)
    for record in records:
        assert not {s.wallet for s in record.shares} & set(BAD_PAYEES)
        assert [s.layers_served for s in record.shares if s.role == "network"] == [6, 0]
    assert first.batches_confirmed >= 1 and first.pending_batches == 0  # other tests' payees may share it
    assert second.batches_confirmed == 0 and second.pending_batches == 0
    assert honest not in pending["unpaid"] and pending["quarantined"] == []
    assert asyncio.run(payments.balance(honest)).unpaid_earnings == 0
    reconcile = asyncio.run(payments.reconcile())
    assert reconcile.ok, reconcile.checks


def test_a_treasury_signed_transfer_is_not_a_deposit(paid: PaidApp) -> None:
    wallet = paid.wallet()  # the treasury now holds client funds to move
    treasury_file = paid.settings.payments.state_dir / "treasury.json"
    treasury = Keypair.from_bytes(bytes(json.loads(treasury_file.read_text())))
    info = httpx.get(paid.base_url + "/deposits/info", timeout=30).json()
    assert info["treasury"] == str(treasury.pubkey())
    asset = AssetSpec(Pubkey.from_string(info["mint"]) if info["mint"] else None, info["decimals"])
    ix = deposit_instruction(treasury.pubkey(), treasury.pubkey(), asset, 1_000)
    blockhash = Hash.from_string(info["blockhash"])
    tx = Transaction([treasury], Message.new_with_blockhash([ix], treasury.pubkey(), blockhash), blockhash)
    response = httpx.post(
        paid.base_url + "/deposits",
        json={"transaction": base64.b64encode(bytes(tx)).decode()},
        headers=wallet.headers,
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "treasury_signed"
    assert asyncio.run(paid.payments().balance(str(treasury.pubkey()))).available == 0
    reconcile = asyncio.run(paid.payments().reconcile())
    assert reconcile.ok, reconcile.checks
