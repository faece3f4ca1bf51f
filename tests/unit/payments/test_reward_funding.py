"""Training rewards are drawn from a funded rewards account; a batch beyond it is refused whole."""

import pytest
from solders.keypair import Keypair

from payments.errors import InsufficientBalance, InvalidRequest
from payments.ledger import accounts as acct
from payments.ledger.accounts import balance_of
from payments.protocol import TrainingReward
from tests.unit.payments.conftest import run


def _rewards_left(service) -> int:  # type: ignore[no-untyped-def]
    with service.ledger.transaction() as conn:
        return balance_of(conn, acct.REWARDS)


def test_an_unfunded_ledger_refuses_rewards(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    wallet = str(Keypair().pubkey())
    with pytest.raises(InsufficientBalance, match="rewards account") as refused:
        service.record_training_rewards([TrainingReward("fl", 1, wallet, amount=1, examples=1)])
    assert refused.value.code == "rewards_unfunded"
    assert service.balance(wallet).unpaid_earnings == 0 and _rewards_left(service) == 0


def test_a_batch_beyond_the_funding_records_nothing_and_reconciles(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    assert service.fund_training_rewards("ops-1", 5_000) == 5_000
    assert service.fund_training_rewards("ops-1", 5_000) == 5_000  # once per reference
    run(service.faucet(str(service.treasury.pubkey()), 5_000))
    wallets = [str(Keypair().pubkey()) for _ in range(3)]
    batch = [TrainingReward("fl", 1, w, amount=2_000, examples=2) for w in wallets]  # 6,000 > 5,000
    with pytest.raises(InsufficientBalance):
        service.record_training_rewards(batch)
    assert [service.balance(w).unpaid_earnings for w in wallets] == [0, 0, 0]
    assert _rewards_left(service) == 5_000
    report = run(service.reconcile())
    assert report.ok and report.details["rewards"] == 0
    # Within the funding it is paid, and recording the same round again is not a second draw.
    assert len(service.record_training_rewards(batch[:2])) == 2
    assert len(service.record_training_rewards(batch[:2])) == 2
    assert _rewards_left(service) == 1_000
    assert run(service.reconcile()).ok


def test_funding_needs_a_reference_and_a_positive_amount(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    for ref, amount in (("", 5), ("ops", 0), ("ops", -5)):
        with pytest.raises(InvalidRequest):
            service.fund_training_rewards(ref, amount)
