"""Two writers on one PostgreSQL ledger, as two payments workers are: each its own `Ledger` (own engine, own
connection pool) on the same database, threads hammering the places where writers meet. Every test asserts
what must hold whatever the interleaving: nothing charged twice, nothing paid twice, nothing lost, and the
double-entry reconcile checks clean.

Run once against the ledger before row locks were added (payments/ledger/ledger.py and accounts.py of
e5ac461), four of the five failed: deposits lost (the other writer created the account first, the insert's
unique violation was taken for "already credited" and the lookup found no deposit: NoResultFound), holds and
reports and group commits failing with unique violations on accounts_pkey and settlements_request_id_key,
reward funding failing on accounts_pkey (chain:inflow). Payout claiming was already one atomic UPDATE.
"""

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from solders.keypair import Keypair

from payments.errors import InsufficientBalance
from payments.ledger import accounts as acct
from payments.ledger.ledger import Ledger, SplitPolicy, make_engine
from payments.ledger.payouts import PayoutBook
from payments.ledger.reconcile import ledger_checks
from payments.pricing import Price
from payments.protocol import HoldRequest, ProviderShare, UsageReport

WORKERS = 2
THREADS = 8


@pytest.fixture
def ledgers(postgres_url: str) -> Iterator[list[Ledger]]:
    """Two ledgers on one database, opened at once (the migration's advisory lock lets one create the schema)."""
    with ThreadPoolExecutor(WORKERS) as pool:
        opened = list(
            pool.map(
                lambda _: Ledger(make_engine(postgres_url), lambda _m: Price(1_000, 2_000), SplitPolicy(500, 100)),
                range(WORKERS),
            )
        )
    yield opened
    for ledger in opened:
        ledger.engine.dispose()


def _hammer(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run every job on THREADS threads, the first wave released together; their results (or raised exceptions)."""
    wave = min(THREADS, len(jobs))
    start = threading.Barrier(wave)

    def run(indexed: tuple[int, Callable[[], Any]]) -> Any:
        index, job = indexed
        if index < wave:
            with contextlib.suppress(threading.BrokenBarrierError):
                start.wait(timeout=30)
        try:
            return job()
        except Exception as exc:  # collected: the test says which ones are allowed
            return exc

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, enumerate(jobs)))


def _clean(ledger: Ledger) -> None:
    checks, figures = ledger_checks(ledger)
    assert all(checks.values()), (checks, figures)


def test_deposits_of_new_wallets_through_both_workers_are_each_credited_once(ledgers: list[Ledger]) -> None:
    wallets = [str(Keypair().pubkey()) for _ in range(4)]
    jobs = [
        (lambda i=i: ledgers[i % WORKERS].credit_deposit(f"sig-{i}", wallets[i % len(wallets)], 1_000 + i, i))
        for i in range(64)
    ]
    results = _hammer(jobs)
    assert [r for r in results if isinstance(r, Exception)] == []
    assert all(r.newly_credited for r in results)
    for w, wallet in enumerate(wallets):
        expected = sum(1_000 + i for i in range(64) if i % len(wallets) == w)
        assert ledgers[0].balance(wallet, "X").available == expected
    _clean(ledgers[0])


def test_concurrent_holds_never_overdraw_and_every_report_is_recorded_once(ledgers: list[Ledger]) -> None:
    payer, provider = str(Keypair().pubkey()), str(Keypair().pubkey())
    deposit = 2_000 * 12  # the hold of one request (1,000 tokens of max_tokens at 2,000 per 1k) is 2,000
    ledgers[0].credit_deposit("sig-payer", payer, deposit, 1)

    def request(i: int) -> str:
        ledger = ledgers[i % WORKERS]
        ledger.place_hold(HoldRequest(f"r{i}", payer, "m", max_tokens=1_000, prompt_tokens=0))
        # Reported through the other worker, twice (a gateway retry): recorded once.
        report = UsageReport(f"r{i}", payer, "m", 0, 500, (ProviderShare(provider, 30),))
        first = ledgers[(i + 1) % WORKERS].record_usage([report])[0]
        again = ledger.record_usage([report])[0]
        assert not isinstance(first, Exception) and not isinstance(again, Exception)
        assert first.settlement_id == again.settlement_id
        return first.settlement_id

    results = _hammer([lambda i=i: request(i) for i in range(32)])
    settled = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, InsufficientBalance)]
    assert len(settled) + len(refused) == 32, [r for r in results if isinstance(r, Exception)][:3]
    cost = 1_000  # 500 completion tokens at 2,000 per 1k
    # Each settled request released its hold beyond the cost, so at least 12 of them fit the deposit.
    assert len(settled) == len(set(settled)) and len(settled) >= 12
    balance = ledgers[1].balance(payer, "X")
    assert balance.available == deposit - cost * len(settled) and balance.available >= 0 and balance.held == 0
    _clean(ledgers[0])


def test_one_request_settled_through_both_workers_at_once_is_recorded_once(ledgers: list[Ledger]) -> None:
    payer, provider = str(Keypair().pubkey()), str(Keypair().pubkey())
    ledgers[0].credit_deposit("sig-payer", payer, 10**9, 1)
    ids = [f"r{i}" for i in range(20)]
    for rid in ids:
        ledgers[0].place_hold(HoldRequest(rid, payer, "m", max_tokens=100, prompt_tokens=10))
    reports = [UsageReport(rid, payer, "m", 10, 50, (ProviderShare(provider, 30),)) for rid in ids]
    # Group commits of the same reports from both workers, in opposite orders.
    jobs = [
        (lambda i=i: ledgers[i % WORKERS].record_usage(reports if i % 2 else list(reversed(reports)))) for i in range(8)
    ]
    results = _hammer(jobs)
    assert [r for r in results if isinstance(r, Exception)] == []
    by_request: dict[str, set[str]] = {}
    for group in results:
        for record in group:
            assert not isinstance(record, Exception), record
            by_request.setdefault(record.request_id, set()).add(record.settlement_id)
    assert all(len(ids_) == 1 for ids_ in by_request.values()) and len(by_request) == len(ids)
    _clean(ledgers[0])


def test_payout_claims_from_both_workers_put_each_share_in_one_batch(ledgers: list[Ledger]) -> None:
    payer = str(Keypair().pubkey())
    providers = [str(Keypair().pubkey()) for _ in range(6)]
    ledgers[0].credit_deposit("sig-payer", payer, 10**9, 1)
    for i in range(12):
        ledgers[0].place_hold(HoldRequest(f"r{i}", payer, "m", max_tokens=100, prompt_tokens=10))
        report = UsageReport(f"r{i}", payer, "m", 10, 50, (ProviderShare(providers[i % 6], 30),))
        ledgers[0].record_usage([report])
    earned = PayoutBook(ledgers[0], fees_in_ledger=False).unpaid()
    books = [PayoutBook(ledger, fees_in_ledger=False) for ledger in ledgers]
    results = _hammer([(lambda i=i: books[i % WORKERS].create_batch(providers)) for i in range(12)])
    batches = [b for b in results if b is not None]
    assert [r for r in batches if isinstance(r, Exception)] == []
    claimed: dict[str, int] = {}
    for batch in batches:
        for wallet, amount in batch.items:
            assert wallet not in claimed, f"{wallet} claimed by two batches"
            claimed[wallet] = amount
    assert claimed == earned and books[1].unpaid() == {}
    with ledgers[1].transaction() as conn:
        assert acct.balance_of(conn, acct.INFLIGHT) == sum(earned.values())
    _clean(ledgers[0])


def test_rewards_funded_and_recorded_through_both_workers_once(ledgers: list[Ledger]) -> None:
    from payments.protocol import TrainingReward

    results = _hammer([(lambda i=i: ledgers[i % WORKERS].fund_rewards("grant-1", 5_000)) for i in range(16)])
    assert [r for r in results if isinstance(r, Exception)] == []
    rewards = [TrainingReward("job", 1, str(Keypair().pubkey()), 1_000, 10) for _ in range(4)]
    recorded = _hammer([(lambda i=i: ledgers[i % WORKERS].record_rewards(rewards)) for i in range(8)])
    assert [r for r in recorded if isinstance(r, Exception)] == []
    with ledgers[0].transaction() as conn:
        assert acct.balance_of(conn, acct.REWARDS) == 5_000 - 4_000  # funded once, each reward recorded once
    assert {r.settlement_id for group in recorded for r in group} == {r.settlement_id for r in recorded[0]}
    _clean(ledgers[0])
