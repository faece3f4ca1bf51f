"""Ledger account names and the posting primitive shared by the ledger modules."""

import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from payments.ledger.schema import accounts, postings

CHAIN_INFLOW = "chain:inflow"  # source of deposits (money that came in on chain)
CHAIN_OUTFLOW = "chain:outflow"  # sink of confirmed payouts
CHAIN_FEES = "chain:fees"  # sink of transaction fees (SOL settlement only)
NETWORK = "network"  # network commission
# Payouts the chain shows for records a restored (older) ledger lost: see payments/catchup.py.
UNRECORDED = "unrecorded"
CHAIN_UNRECORDED = "chain:unrecorded"
INFLIGHT = "payout:inflight"  # payouts put into a batch, not yet confirmed
REWARDS = "rewards"  # source of training rewards granted by the network


def client(wallet: str) -> str:
    """Spendable balance of a paying wallet."""
    return f"client:{wallet}"


def held(wallet: str) -> str:
    """Amount held for a wallet's in-flight requests."""
    return f"hold:{wallet}"


def payee(wallet: str) -> str:
    """Unpaid earnings of a provider or proxy wallet."""
    return f"payee:{wallet}"


@dataclass(frozen=True, slots=True)
class Posting:
    """One movement: `amount` base units from one account to another."""

    ref: str
    kind: str
    from_account: str
    to_account: str
    amount: int


def apply_postings(conn: Connection, items: list[Posting]) -> None:
    """Insert the postings and update the cached balances, in the caller's transaction."""
    items = [p for p in items if p.amount != 0]
    if not items:
        return
    now = time.time()
    deltas: dict[str, int] = defaultdict(int)
    for p in items:
        if p.amount < 0:
            raise ValueError(f"negative posting {p}")
        deltas[p.from_account] -= p.amount
        deltas[p.to_account] += p.amount
    ensure_accounts(conn, list(deltas))
    conn.execute(
        postings.insert(),
        [
            {
                "ref": p.ref,
                "kind": p.kind,
                "from_account": p.from_account,
                "to_account": p.to_account,
                "amount": p.amount,
                "created_at": now,
            }
            for p in items
        ],
    )
    # Sorted: every transaction locks account rows in the same order, so two writers cannot deadlock.
    changes = [{"n": name, "d": delta} for name, delta in sorted(deltas.items()) if delta != 0]
    if changes:
        conn.execute(
            update(accounts)
            .where(accounts.c.name == bindparam("n"))
            .values(balance=accounts.c.balance + bindparam("d")),
            changes,
        )


def ensure_accounts(conn: Connection, names: list[str]) -> None:
    """Create missing accounts with a zero balance, in the caller's transaction.

    INSERT .. ON CONFLICT DO NOTHING: two workers creating the same account at once (a new wallet's first
    two requests through two gateways) both succeed instead of one failing on the primary key.
    """
    wanted = sorted(set(names))
    existing = set(conn.execute(select(accounts.c.name).where(accounts.c.name.in_(wanted))).scalars())
    new = [n for n in wanted if n not in existing]
    if not new:
        return
    rows = [{"name": n, "balance": 0} for n in new]
    if conn.dialect.name == "postgresql":
        conn.execute(pg_insert(accounts).on_conflict_do_nothing(index_elements=["name"]), rows)
    elif conn.dialect.name == "sqlite":
        conn.execute(sqlite_insert(accounts).on_conflict_do_nothing(index_elements=["name"]), rows)
    else:
        conn.execute(accounts.insert(), rows)


def lock_account(conn: Connection, name: str) -> int:
    """Create `name` if missing and lock its row until the transaction ends (SELECT .. FOR UPDATE on
    PostgreSQL; SQLite has one writer, so its write transaction already excludes others); its balance."""
    ensure_accounts(conn, [name])
    value = conn.execute(select(accounts.c.balance).where(accounts.c.name == name).with_for_update()).scalar()
    return int(value or 0)


def balance_of(conn: Connection, name: str) -> int:
    """The cached balance of an account (0 when it does not exist)."""
    value = conn.execute(select(accounts.c.balance).where(accounts.c.name == name)).scalar()
    return int(value or 0)
