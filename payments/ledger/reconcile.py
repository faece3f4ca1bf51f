"""Ledger self-checks: double entry holds, balances match postings, records match postings."""

import time

from sqlalchemy import func, select

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


def _sum(conn, stmt) -> int:  # type: ignore[no-untyped-def]
    return int(conn.execute(stmt).scalar() or 0)


def ledger_checks(
    ledger: Ledger, hold_max_age_s: float | None = None, now: float | None = None
) -> tuple[dict[str, bool], dict[str, int]]:
    """Run every ledger-only check in one read transaction; returns (checks, figures).

    With `hold_max_age_s`, no open hold may be older than that (the sweep releases such orphans).
    """
    now = time.time() if now is None else now
    with ledger.transaction() as conn:
        oldest_hold = conn.execute(select(func.min(holds.c.created_at)).where(holds.c.state == "open")).scalar()
        cached = dict(conn.execute(select(accounts.c.name, accounts.c.balance)).all())
        credits = dict(
            conn.execute(
                select(postings.c.to_account, func.sum(postings.c.amount)).group_by(postings.c.to_account)
            ).all()
        )
        debits = dict(
            conn.execute(
                select(postings.c.from_account, func.sum(postings.c.amount)).group_by(postings.c.from_account)
            ).all()
        )
        charged = _sum(conn, select(func.sum(postings.c.amount)).where(postings.c.kind == "charge"))
        to_payees = _sum(
            conn,
            select(func.sum(postings.c.amount)).where(
                postings.c.kind == "charge", postings.c.to_account.like("payee:%")
            ),
        )
        to_network = _sum(
            conn,
            select(func.sum(postings.c.amount)).where(
                postings.c.kind == "charge", postings.c.to_account == acct.NETWORK
            ),
        )
        fees = _sum(conn, select(func.sum(postings.c.amount)).where(postings.c.kind == "fee"))
        rewarded = _sum(conn, select(func.sum(postings.c.amount)).where(postings.c.kind == "reward"))
        record_cost = _sum(conn, select(func.sum(settlements.c.cost)))
        record_shares = _sum(conn, select(func.sum(settlement_shares.c.amount)))
        unpaid_shares = _sum(
            conn,
            select(func.sum(settlement_shares.c.amount)).where(
                settlement_shares.c.batch_id.is_(None),
                settlement_shares.c.role.notin_(("network", "withheld")),
            ),
        )
        open_items = _sum(
            conn,
            select(func.sum(payout_items.c.amount))
            .select_from(payout_items.join(payout_batches, payout_items.c.batch_id == payout_batches.c.id))
            .where(payout_batches.c.state.in_(("created", "signed", "sent"))),
        )
        paid_items = _sum(
            conn,
            select(func.sum(payout_items.c.amount))
            .select_from(payout_items.join(payout_batches, payout_items.c.batch_id == payout_batches.c.id))
            .where(payout_batches.c.state == "confirmed"),
        )
        batched_shares = _sum(
            conn,
            select(func.sum(settlement_shares.c.amount)).where(settlement_shares.c.batch_id.is_not(None)),
        )
        all_items = _sum(
            conn,
            select(func.sum(payout_items.c.amount))
            .select_from(payout_items.join(payout_batches, payout_items.c.batch_id == payout_batches.c.id))
            .where(payout_batches.c.state != "failed"),
        )
    hold_age_s = 0.0 if oldest_hold is None else max(0.0, now - float(oldest_hold))
    names = set(cached) | set(credits) | set(debits)
    payee_total = sum(v for k, v in cached.items() if k.startswith("payee:"))
    liabilities = sum(
        v for k, v in cached.items() if k.startswith(("client:", "hold:", "payee:")) or k == acct.INFLIGHT
    )
    checks = {
        "balances_sum_to_zero": sum(cached.values()) == 0,
        "balances_match_postings": all(
            cached.get(n, 0) == int(credits.get(n, 0) or 0) - int(debits.get(n, 0) or 0) for n in names
        ),
        # client debits = provider credits + commission (+ chain fees, which come out of commission)
        "charges_equal_payee_plus_commission": charged == to_payees + to_network,
        "network_equals_commission_minus_fees": cached.get(acct.NETWORK, 0) == to_network - fees,
        "records_match_charges": record_cost == charged + rewarded == record_shares,
        "payee_balances_match_unpaid_shares": payee_total == unpaid_shares,
        "inflight_matches_open_batches": cached.get(acct.INFLIGHT, 0) == open_items,
        "outflow_matches_confirmed_batches": cached.get(acct.CHAIN_OUTFLOW, 0) == paid_items,
        "batched_shares_match_batch_items": batched_shares == all_items,
        "no_negative_client_balance": all(
            v >= 0 for k, v in cached.items() if k.startswith(("client:", "hold:", "payee:"))
        ),
        "no_stale_holds": hold_max_age_s is None or hold_age_s <= hold_max_age_s,
        # A restored ledger: the chain paid for records the backup did not have yet (payments/catchup.py).
        "payouts_all_recorded": cached.get(acct.CHAIN_UNRECORDED, 0) == 0,
    }
    figures = {
        "deposits": -cached.get(acct.CHAIN_INFLOW, 0),
        "charged": charged,
        "to_payees": to_payees,
        "to_network": to_network,
        "rewards": rewarded,
        "chain_fees": fees,
        "paid_out": paid_items,
        "in_flight": open_items,
        "unpaid": unpaid_shares,
        "liabilities": liabilities,
        "oldest_open_hold_s": int(hold_age_s),
        "unrecorded_payouts": cached.get(acct.CHAIN_UNRECORDED, 0),
    }
    return checks, figures
