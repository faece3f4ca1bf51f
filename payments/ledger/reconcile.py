"""Ledger self-checks: double entry holds, balances match postings, records match postings.

`ledger_checks` reads every figure in one read transaction (`read_totals`), then compares them
(`checks_of`) and reports them (`figures_of`).
"""

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from payments.ledger import accounts as acct
from payments.ledger.ledger import Ledger
from payments.ledger.schema import (
    accounts,
    holds,
    payout_batches,
    payout_items,
    postings,
    settlement_shares,
    settlements,
)

_ITEMS_OF_BATCHES = payout_items.join(payout_batches, payout_items.c.batch_id == payout_batches.c.id)


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """What the checks compare, read at one point in time (amounts in base units)."""

    oldest_open_hold_at: float | None
    balances: dict[str, int]  # account -> cached balance
    credits: dict[str, int]  # account -> sum of postings to it
    debits: dict[str, int]  # account -> sum of postings from it
    charged: int  # client charges
    to_payees: int  # the charges' provider (and proxy) part
    to_network: int  # the charges' commission part
    fees: int  # chain fees (out of commission)
    rewarded: int  # training rewards
    record_cost: int  # settlement records' cost
    record_shares: int  # their shares
    unpaid_shares: int  # payee shares in no batch yet
    open_items: int  # payout items of batches not yet confirmed or failed
    paid_items: int  # payout items of confirmed batches
    batched_shares: int  # shares in a batch
    live_items: int  # payout items of batches that did not fail


def _sum(conn: Connection, stmt: Any) -> int:
    return int(conn.execute(stmt).scalar() or 0)


def _postings_sum(conn: Connection, *where: Any) -> int:
    return _sum(conn, select(func.sum(postings.c.amount)).where(*where))


def _items_sum(conn: Connection, *where: Any) -> int:
    return _sum(conn, select(func.sum(payout_items.c.amount)).select_from(_ITEMS_OF_BATCHES).where(*where))


def _by_account(conn: Connection, column: Any) -> dict[str, int]:
    return {
        name: int(total or 0)
        for name, total in conn.execute(select(column, func.sum(postings.c.amount)).group_by(column))
    }


def read_totals(conn: Connection) -> LedgerTotals:
    """Every figure the checks need, inside the caller's transaction."""
    charge = postings.c.kind == "charge"
    return LedgerTotals(
        oldest_open_hold_at=conn.execute(select(func.min(holds.c.created_at)).where(holds.c.state == "open")).scalar(),
        balances={name: int(balance) for name, balance in conn.execute(select(accounts.c.name, accounts.c.balance))},
        credits=_by_account(conn, postings.c.to_account),
        debits=_by_account(conn, postings.c.from_account),
        charged=_postings_sum(conn, charge),
        to_payees=_postings_sum(conn, charge, postings.c.to_account.like("payee:%")),
        to_network=_postings_sum(conn, charge, postings.c.to_account == acct.NETWORK),
        fees=_postings_sum(conn, postings.c.kind == "fee"),
        rewarded=_postings_sum(conn, postings.c.kind == "reward"),
        record_cost=_sum(conn, select(func.sum(settlements.c.cost))),
        record_shares=_sum(conn, select(func.sum(settlement_shares.c.amount))),
        unpaid_shares=_sum(
            conn,
            select(func.sum(settlement_shares.c.amount)).where(
                settlement_shares.c.batch_id.is_(None),
                settlement_shares.c.role.notin_(("network", "withheld")),
            ),
        ),
        open_items=_items_sum(conn, payout_batches.c.state.in_(("created", "signed", "sent"))),
        paid_items=_items_sum(conn, payout_batches.c.state == "confirmed"),
        batched_shares=_sum(
            conn, select(func.sum(settlement_shares.c.amount)).where(settlement_shares.c.batch_id.is_not(None))
        ),
        live_items=_items_sum(conn, payout_batches.c.state != "failed"),
    )


def checks_of(totals: LedgerTotals, hold_age_s: float, hold_max_age_s: float | None) -> dict[str, bool]:
    """Each named check, True when it holds."""
    t, cached = totals, totals.balances
    names = set(cached) | set(t.credits) | set(t.debits)
    payee_total = sum(v for k, v in cached.items() if k.startswith("payee:"))
    return {
        "balances_sum_to_zero": sum(cached.values()) == 0,
        "balances_match_postings": all(cached.get(n, 0) == t.credits.get(n, 0) - t.debits.get(n, 0) for n in names),
        # client debits = provider credits + commission (+ chain fees, which come out of commission)
        "charges_equal_payee_plus_commission": t.charged == t.to_payees + t.to_network,
        "network_equals_commission_minus_fees": cached.get(acct.NETWORK, 0) == t.to_network - t.fees,
        "records_match_charges": t.record_cost == t.charged + t.rewarded == t.record_shares,
        "payee_balances_match_unpaid_shares": payee_total == t.unpaid_shares,
        "inflight_matches_open_batches": cached.get(acct.INFLIGHT, 0) == t.open_items,
        "outflow_matches_confirmed_batches": cached.get(acct.CHAIN_OUTFLOW, 0) == t.paid_items,
        "batched_shares_match_batch_items": t.batched_shares == t.live_items,
        "no_negative_client_balance": all(
            v >= 0 for k, v in cached.items() if k.startswith(("client:", "hold:", "payee:"))
        ),
        "no_stale_holds": hold_max_age_s is None or hold_age_s <= hold_max_age_s,
        # A restored ledger: the chain paid for records the backup did not have yet (payments/catchup.py).
        "payouts_all_recorded": cached.get(acct.CHAIN_UNRECORDED, 0) == 0,
    }


def figures_of(totals: LedgerTotals, hold_age_s: float) -> dict[str, int]:
    """The figures the reconcile report shows beside the checks."""
    t, cached = totals, totals.balances
    liabilities = sum(
        v for k, v in cached.items() if k.startswith(("client:", "hold:", "payee:")) or k == acct.INFLIGHT
    )
    return {
        "deposits": -cached.get(acct.CHAIN_INFLOW, 0),
        "charged": t.charged,
        "to_payees": t.to_payees,
        "to_network": t.to_network,
        "rewards": t.rewarded,
        "chain_fees": t.fees,
        "paid_out": t.paid_items,
        "in_flight": t.open_items,
        "unpaid": t.unpaid_shares,
        "liabilities": liabilities,
        "oldest_open_hold_s": int(hold_age_s),
        "unrecorded_payouts": cached.get(acct.CHAIN_UNRECORDED, 0),
    }


def ledger_checks(
    ledger: Ledger, hold_max_age_s: float | None = None, now: float | None = None
) -> tuple[dict[str, bool], dict[str, int]]:
    """Run every ledger-only check in one read transaction; returns (checks, figures).

    With `hold_max_age_s`, no open hold may be older than that (the sweep releases such orphans).
    """
    now = time.time() if now is None else now
    with ledger.transaction() as conn:
        totals = read_totals(conn)
    oldest = totals.oldest_open_hold_at
    hold_age_s = 0.0 if oldest is None else max(0.0, now - float(oldest))
    return checks_of(totals, hold_age_s, hold_max_age_s), figures_of(totals, hold_age_s)
