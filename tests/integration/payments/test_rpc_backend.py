"""The JSON-RPC backend end to end, against the loopback JSON-RPC test fixture (LiteSVM)."""

import asyncio
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from solders.keypair import Keypair
from solders.message import Message
from solders.signature import Signature
from solders.transaction import Transaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import get_associated_token_address, transfer_checked
from spl.token.models import TransferCheckedParams

from cluster.config.payments import PaymentsSection
from payments.chain.rpc_backend import RpcBackend
from payments.errors import ChainError
from payments.protocol import DepositRequest
from payments.service import PaymentsService
from tests.integration.payments.loopback_rpc_fixture import LoopbackRpcValidator
from tests.unit.payments.conftest import onchain_amount, run, serve_request


@pytest.fixture
def validator() -> Iterator[LoopbackRpcValidator]:
    node = LoopbackRpcValidator().start()
    yield node
    node.stop()


@pytest.fixture(params=[False, True], ids=["legacy", "v0"])
def service(
    validator: LoopbackRpcValidator, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[PaymentsService]:
    treasury = Keypair()
    keypair_path = tmp_path / "treasury.json"
    keypair_path.write_text(json.dumps(list(bytes(treasury))))
    mint = validator.bootstrap(treasury, tmp_path / "setup")
    section = PaymentsSection(
        state_dir=tmp_path / "state",
        chain_backend="rpc",
        rpc_url=validator.url,
        treasury_keypair_path=keypair_path,
        mint=mint,
        mint_decimals=6,
        use_versioned_tx=request.param,
        batch_max_transfers=64,
    )
    svc = run(PaymentsService.create(section))
    assert isinstance(svc.chain, RpcBackend)
    yield svc
    run(svc.close())


def rpc_deposit(service: PaymentsService, validator: LoopbackRpcValidator, amount: int) -> Keypair:
    payer = Keypair()
    validator.faucet(service.treasury, str(service.asset.mint), payer.pubkey(), amount)
    raw = deposit_tx_rpc(service, payer, amount)
    run(service.chain.send_raw(raw))  # a client sends its own deposit on a real cluster (no relaying)
    signature = str(Transaction.from_bytes(raw).signatures[0])
    credited = run(service.deposit(DepositRequest(signature)))
    assert credited.newly_credited and credited.amount == amount
    return payer


def deposit_tx_rpc(service: PaymentsService, payer: Keypair, amount: int) -> bytes:
    """A client-signed token transfer to the treasury, with a blockhash read over RPC."""
    mint = service.asset.mint
    assert mint is not None
    ix = transfer_checked(
        TransferCheckedParams(
            program_id=TOKEN_PROGRAM_ID,
            source=get_associated_token_address(payer.pubkey(), mint),
            mint=mint,
            dest=get_associated_token_address(service.treasury.pubkey(), mint),
            owner=payer.pubkey(),
            amount=amount,
            decimals=service.asset.decimals,
        )
    )
    blockhash, _ = run(service.chain.latest_blockhash())
    return bytes(Transaction([payer], Message.new_with_blockhash([ix], payer.pubkey(), blockhash), blockhash))


def test_rpc_deposit_requests_batched_payouts_match_the_ledger(service, validator) -> None:  # type: ignore[no-untyped-def]
    client = rpc_deposit(service, validator, 3_000_000)
    providers = [str(Keypair().pubkey()) for _ in range(12)]
    earned: dict[str, int] = defaultdict(int)
    for i in range(16):
        record = serve_request(
            service,
            f"r{i}",
            str(client.pubkey()),
            [(providers[i % 12], 10), (providers[(i + 3) % 12], 20)],
        )
        for share in record.shares:
            if share.role == "provider":
                earned[share.wallet] += share.amount
    report = run(service.settle())
    assert report.pending_batches == 0 and report.payouts_confirmed == 12
    if service.section.use_versioned_tx:
        # creating 12 token accounts exceeds the 64-instruction trace of one transaction: 8 + 4
        assert report.batches_confirmed == 2
    for wallet, amount in earned.items():
        assert onchain_amount(service, wallet) == amount
    assert run(service.reconcile()).ok
    assert {"sendTransaction", "getSignatureStatuses", "getTransaction"} <= set(validator.calls)


def test_rpc_expired_blockhash_resigns_once(service, validator) -> None:  # type: ignore[no-untyped-def]
    client = rpc_deposit(service, validator, 100_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)])
    batch = service.book.create_batch([provider])
    run(service.settler._sign(batch))
    stale = service.book.get(batch.batch_id).signature
    validator.expire_blockhash()
    run(service.settle())
    final = service.book.get(batch.batch_id)
    assert final.state == "confirmed" and final.signature != stale and final.attempt == 2
    assert onchain_amount(service, provider) == final.items[0][1]
    assert stale in validator.dropped  # the stale transaction was sent, dropped, then re-signed


def test_transport_errors_are_wrapped(validator) -> None:  # type: ignore[no-untyped-def]
    validator.stop()
    backend = RpcBackend(validator.url, timeout_s=2.0)

    async def call() -> None:
        try:
            await backend.signature_status(Signature.default())
        finally:
            await backend.close()

    with pytest.raises(ChainError) as info:
        asyncio.run(call())
    assert info.value.__cause__ is not None


def test_rpc_batch_waits_for_commitment_and_is_never_resigned_once_landed(service, validator) -> None:  # type: ignore[no-untyped-def]
    client = rpc_deposit(service, validator, 100_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)])
    validator.set_confirmation("processed")
    first = run(service.settle())
    assert first.batches_confirmed == 0 and first.pending_batches == 1
    validator.expire_blockhash()  # landed but unconfirmed: waiting, not re-signing
    assert run(service.settle()).pending_batches == 1
    validator.set_confirmation("confirmed")
    assert run(service.settle()).batches_confirmed == 1
    [batch] = service.book.confirmed_batches()
    assert batch.attempt == 1 and onchain_amount(service, provider) == batch.items[0][1]


def test_rpc_lagging_status_node_does_not_resign_a_batch_that_landed(service, validator) -> None:  # type: ignore[no-untyped-def]
    client = rpc_deposit(service, validator, 100_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r0", str(client.pubkey()), [(provider, 1)])
    run(service.settle())  # paid once before: its token account (and v0 lookup table entries) exist
    earlier = onchain_amount(service, provider)
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)])
    validator.set_lagging(True)  # the batch lands, but its status is "not found" and the height is far on
    run(service.settle())
    run(service.settle())
    [batch] = service.book.open_batches()
    assert batch.attempt == 1, "re-signed a batch that had landed"
    paid = onchain_amount(service, provider)
    assert paid == earlier + batch.items[0][1]
    validator.set_lagging(False)
    assert run(service.settle()).batches_confirmed == 1
    assert [b.attempt for b in service.book.confirmed_batches()] == [1, 1]
    assert onchain_amount(service, provider) == paid
    assert "getSignaturesForAddress" in validator.calls and run(service.reconcile()).ok


def test_rpc_relay_is_refused_and_a_client_sent_deposit_is_credited(service, validator) -> None:  # type: ignore[no-untyped-def]
    from payments.errors import InvalidRequest

    payer = Keypair()
    validator.faucet(service.treasury, str(service.asset.mint), payer.pubkey(), 5_000)
    raw = deposit_tx_rpc(service, payer, 5_000)
    with pytest.raises(InvalidRequest) as refused:
        run(service.submit_transaction(raw))
    assert refused.value.status_code == 400 and refused.value.code == "relay_unsupported"
    run(service.chain.send_raw(raw))  # the client sends it itself, then gives the signature
    signature = str(Transaction.from_bytes(raw).signatures[0])
    assert run(service.deposit(DepositRequest(signature))).amount == 5_000
