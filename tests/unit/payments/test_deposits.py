"""Deposits are verified on chain (recipient, mint, success) and credited once."""

import pytest
from solders.keypair import Keypair
from solders.signature import Signature

from payments.errors import DepositRejected, InvalidRequest
from payments.protocol import DepositRequest
from tests.unit.payments.conftest import deposit_tx, run


def test_transfer_to_someone_else_is_not_a_deposit(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    payer, other = Keypair(), Keypair()
    run(service.faucet(str(payer.pubkey()), 1_000))
    run(service.faucet(str(other.pubkey()), 0))
    signature = run(service.submit_transaction(bytes(deposit_tx(service, payer, 500, to=other.pubkey()))))
    with pytest.raises(DepositRejected):
        run(service.deposit(DepositRequest(signature)))
    assert service.balance(str(payer.pubkey())).available == 0


def test_failed_transfer_is_not_credited(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    payer = Keypair()
    run(service.faucet(str(payer.pubkey()), 100))
    signature = run(service.submit_transaction(bytes(deposit_tx(service, payer, 1_000))))  # more than it has
    with pytest.raises(DepositRejected, match="failed on chain"):
        run(service.deposit(DepositRequest(signature)))


def test_unknown_or_malformed_signature(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    with pytest.raises(InvalidRequest):
        run(service.deposit(DepositRequest("not-a-signature")))
    with pytest.raises(InvalidRequest, match="not found"):
        run(service.deposit(DepositRequest(str(Signature.default()))))


def test_sol_deposit_credits_the_sender_once(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service(section={"asset": "sol"})
    payer = Keypair()
    run(service.faucet(str(payer.pubkey()), 5 * 10**9))
    signature = run(service.submit_transaction(bytes(deposit_tx(service, payer, 2 * 10**9))))
    first = run(service.deposit(DepositRequest(signature)))
    second = run(service.deposit(DepositRequest(signature)))
    assert first.wallet == str(payer.pubkey()) and first.amount == 2 * 10**9
    assert first.newly_credited and not second.newly_credited
    assert service.balance(str(payer.pubkey())).available == 2 * 10**9
