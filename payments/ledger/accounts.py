"""Ledger account names and the posting primitive shared by the ledger modules."""

import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select, update

from payments.ledger.schema import accounts, postings

CHAIN_INFLOW = "chain:inflow"  # source of deposits (money that came in on chain)
CHAIN_OUTFLOW = "chain:outflow"  # sink of confirmed payouts
CHAIN_FEES = "chain:fees"  # sink of transaction fees (SOL settlement only)
NETWORK = "network"  # network commission
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
    changes = [{"n": name, "d": delta} for name, delta in deltas.items() if delta != 0]
    if changes:
        conn.execute(
            update(accounts)
            .where(accounts.c.name == bindparam("n"))
            .values(balance=accounts.c.balance + bindparam("d")),
            changes,
        )


def ensure_accounts(conn: Connection, names: list[str]) -> None:
    """Create missing accounts with a zero balance, in the caller's transaction."""
    existing = set(
        conn.execute(select(accounts.c.name).where(accounts.c.name.in_(names))).scalars()
    )
    new = [n for n in dict.fromkeys(names) if n not in existing]
    if new:
        conn.execute(accounts.insert(), [{"name": n, "balance": 0} for n in new])


def balance_of(conn: Connection, name: str) -> int:
    """The cached balance of an account (0 when it does not exist)."""
    value = conn.execute(select(accounts.c.balance).where(accounts.c.name == name)).scalar()
    return int(value or 0)
