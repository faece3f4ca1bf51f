"""Withholding a provider's payout for one request after a failed audit (ledger only)."""

import pytest
from solders.keypair import Keypair
from sqlalchemy import Engine

from payments.errors import NotFound
from payments.ledger.ledger import Ledger, SplitPolicy
from payments.ledger.payouts import PayoutBook
from payments.ledger.reconcile import ledger_checks
from payments.ledger.withholding import WITHHELD, withhold_payout
from payments.pricing import Price
from payments.protocol import HoldRequest, ProviderShare, UsageReport, WithholdPayout

PAYER = "payer1"
GOOD, BAD = (str(Keypair.from_seed(bytes([i]) * 32).pubkey()) for i in (1, 2))  # payees are real addresses


@pytest.fixture
def ledger(ledger_engine: Engine) -> Ledger:
    ledger = Ledger(ledger_engine, lambda model: Price(1_000, 2_000), SplitPolicy(500, 0))
    ledger.credit_deposit("sig1", PAYER, 10_000, slot=1)
    for rid in ("r1", "r2"):
        ledger.place_hold(HoldRequest(rid, PAYER, "m", max_tokens=256, prompt_tokens=100))
        ledger.record_usage([UsageReport(rid, PAYER, "m", 100, 50, (ProviderShare(GOOD, 3), ProviderShare(BAD, 3)))])
    return ledger


def assert_balanced(ledger: Ledger) -> None:
    checks, _ = ledger_checks(ledger)
    assert [name for name, ok in checks.items() if not ok] == []


def account(ledger: Ledger, name: str) -> int:
    from payments.ledger.accounts import balance_of

    with ledger.transaction() as conn:
        return balance_of(conn, name)


def test_withholding_moves_only_that_providers_share_of_that_request(ledger: Ledger) -> None:
    before = PayoutBook(ledger, True).unpaid()
    assert before == {GOOD: 190, BAD: 190}  # 2 requests x 95 (200 cost - 5% network, split 3:3)

    result = withhold_payout(ledger, WithholdPayout("r1", (BAD,)))

    assert (result.amount, result.wallets, result.too_late) == (95, (BAD,), ())
    assert PayoutBook(ledger, True).unpaid() == {GOOD: 190, BAD: 95}  # r2's share is still owed
    assert account(ledger, WITHHELD) == 95
    assert ledger.balance(PAYER, "SOL").available == 10_000 - 400  # the client's charge is unchanged
    assert_balanced(ledger)


def test_withholding_twice_withholds_once(ledger: Ledger) -> None:
    withhold_payout(ledger, WithholdPayout("r1", (BAD,)))
    again = withhold_payout(ledger, WithholdPayout("r1", (BAD,)))
    assert again.amount == 0 and account(ledger, WITHHELD) == 95
    assert_balanced(ledger)


def test_a_share_already_in_a_payout_batch_is_too_late(ledger: Ledger) -> None:
    batch = PayoutBook(ledger, True).create_batch([BAD])
    assert batch is not None
    result = withhold_payout(ledger, WithholdPayout("r1", (BAD,)))
    assert (result.amount, result.too_late) == (0, (BAD,))
    assert_balanced(ledger)


def test_withholding_an_unknown_request_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        withhold_payout(ledger, WithholdPayout("nope", (BAD,)))


def test_a_withheld_share_does_not_keep_the_receipt_unsettled(ledger: Ledger) -> None:
    result = withhold_payout(ledger, WithholdPayout("r1", (BAD, GOOD)))
    record, settled, _ = ledger.settlement(result.settlement_id)
    assert {s.role for s in record.shares} == {"withheld", "network"}
    assert settled  # nothing of it is left to pay
