"""The ledger alone (no chain): holds, settlement records, double entry at every step."""

import random

import pytest
from solders.keypair import Keypair
from sqlalchemy import Engine

from payments.errors import InsufficientBalance, InvalidRequest, NotFound
from payments.ledger.ledger import Ledger, SplitPolicy
from payments.ledger.reconcile import ledger_checks
from payments.pricing import Price
from payments.protocol import HoldRequest, ProviderShare, UsageReport

# Payees must be real addresses (payments.ledger.payees); the payer is whatever the sign-in said.
PAYER = "payer1"
P1, P2, PROXY = (str(Keypair.from_seed(bytes([i]) * 32).pubkey()) for i in (1, 2, 3))


@pytest.fixture
def ledger(ledger_engine: Engine) -> Ledger:
    return Ledger(ledger_engine, lambda model: Price(1_000, 2_000), SplitPolicy(500, 100))


def assert_balanced(ledger: Ledger) -> None:
    checks, _ = ledger_checks(ledger)
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, failed


def usage(rid: str, prompt: int = 100, completion: int = 50, proxy: str | None = None) -> UsageReport:
    return UsageReport(rid, PAYER, "m", prompt, completion, (ProviderShare(P1, 20), ProviderShare(P2, 10)), proxy)


def test_deposit_is_credited_once(ledger: Ledger) -> None:
    first = ledger.credit_deposit("sig1", PAYER, 1_000, slot=5)
    again = ledger.credit_deposit("sig1", PAYER, 1_000, slot=5)
    assert first.newly_credited and not again.newly_credited
    assert ledger.balance(PAYER, "SOL").available == 1_000
    assert_balanced(ledger)


def test_hold_beyond_balance_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    ledger.credit_deposit("sig1", PAYER, 300, slot=1)
    # 100 prompt + 256 max_tokens: 100*1 + 256*2 = 612 > 300
    with pytest.raises(InsufficientBalance) as info:
        ledger.place_hold(HoldRequest("r1", PAYER, "m", max_tokens=256, prompt_tokens=100))
    assert info.value.status_code == 402
    assert ledger.balance(PAYER, "SOL").available == 300
    assert_balanced(ledger)


def test_settlement_charges_actual_cost_and_releases_the_rest(ledger: Ledger) -> None:
    ledger.credit_deposit("sig1", PAYER, 10_000, slot=1)
    hold = ledger.place_hold(HoldRequest("r1", PAYER, "m", max_tokens=256, prompt_tokens=100))
    assert hold.amount == 612 and hold.balance_after == 10_000 - 612
    [record] = ledger.record_usage([usage("r1", proxy=PROXY)])
    assert record.cost == 200  # 100 * 1 + 50 * 2
    amounts = {(s.wallet, s.role): s.amount for s in record.shares}
    assert amounts == {
        (P1, "provider"): 125,
        (P2, "provider"): 63,
        ("network", "network"): 10,
        (PROXY, "proxy"): 2,
    }
    balance = ledger.balance(PAYER, "SOL")
    assert (balance.available, balance.held) == (10_000 - 200, 0)
    assert ledger.balance(P1, "SOL").unpaid_earnings == 125
    assert_balanced(ledger)


def test_reporting_twice_returns_the_same_record_and_charges_once(ledger: Ledger) -> None:
    ledger.credit_deposit("sig1", PAYER, 10_000, slot=1)
    ledger.place_hold(HoldRequest("r1", PAYER, "m", max_tokens=256, prompt_tokens=100))
    [first] = ledger.record_usage([usage("r1")])
    [second] = ledger.record_usage([usage("r1")])
    assert first == second
    assert ledger.balance(PAYER, "SOL").available == 10_000 - first.cost
    assert_balanced(ledger)


def test_failed_request_is_not_charged(ledger: Ledger) -> None:
    ledger.credit_deposit("sig1", PAYER, 10_000, slot=1)
    ledger.place_hold(HoldRequest("r1", PAYER, "m", max_tokens=256))
    assert ledger.release_hold("r1") is True
    assert ledger.release_hold("r1") is False
    assert ledger.balance(PAYER, "SOL").available == 10_000
    [result] = ledger.record_usage([usage("r1")])
    assert isinstance(result, InvalidRequest)
    with pytest.raises(NotFound):
        ledger.release_hold("never-held")
    assert_balanced(ledger)


def test_group_commit_isolates_bad_reports(ledger: Ledger) -> None:
    ledger.credit_deposit("sig1", PAYER, 10_000, slot=1)
    ledger.place_hold(HoldRequest("r1", PAYER, "m", max_tokens=100))
    results = ledger.record_usage([usage("r1", completion=10), usage("nohold"), usage("r1", completion=10)])
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], NotFound) and isinstance(results[2], NotFound)
    assert_balanced(ledger)


def test_double_entry_holds_after_every_operation(ledger: Ledger) -> None:
    rng = random.Random(7)
    ledger.credit_deposit("sig0", PAYER, 50_000, slot=1)
    open_ids: list[str] = []
    for step in range(60):
        action = rng.choice(["hold", "settle", "release", "deposit"])
        if action == "hold":
            try:
                ledger.place_hold(HoldRequest(f"r{step}", PAYER, "m", max_tokens=rng.randint(1, 400)))
                open_ids.append(f"r{step}")
            except InsufficientBalance:
                pass
        elif action == "deposit":
            ledger.credit_deposit(f"sig{step}", PAYER, rng.randint(1, 5_000), slot=step)
        elif open_ids:
            rid = open_ids.pop(rng.randrange(len(open_ids)))
            if action == "settle":
                ledger.record_usage([usage(rid, prompt=rng.randint(0, 50), completion=rng.randint(0, 1))])
            else:
                ledger.release_hold(rid)
        assert_balanced(ledger)


def test_tampering_is_detected(ledger: Ledger) -> None:
    ledger.credit_deposit("sig1", PAYER, 1_000, slot=1)
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE accounts SET balance = balance + 1 WHERE name = 'client:payer1'")
    checks, _ = ledger_checks(ledger)
    assert not checks["balances_sum_to_zero"] and not checks["balances_match_postings"]
