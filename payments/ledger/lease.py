"""A lease in the ledger's database: at most one holder at a time, taken over once its holder stops renewing.

Several payments workers share one ledger; only one may run settlement (sign and send payouts) at a time.
The lease is one row of `settlement_lease`: whoever holds it, until when. It is taken with one atomic
conditional UPDATE (`WHERE holder = me OR expires_at < now`), so of two workers racing for an expired lease
exactly one matches the row; the first take ever is an INSERT, and the primary key lets only one win.
A worker renews before each side effect (`SettlementLease.ensure`) and stops, before sending anything,
when the renewal finds another holder: a worker paused past its lease (GC, a stuck event loop) cannot send
next to the one that took over. Clocks: `expires_at` is compared with the database's own clock when it has
one (PostgreSQL `now()`), so workers on machines with skewed clocks agree; SQLite uses the caller's.

Written here rather than taken from a library: the lock libraries on PyPI (pottery, python-redis-lock,
sherlock) need Redis/etcd, and PostgreSQL advisory locks die with their connection, which a pooled engine
does not tie to a worker's lifetime; a row with an expiry works on both SQLite and PostgreSQL.
"""

import logging
import time
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, case, delete, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError

from payments.ledger.schema import settlement_lease

logger = logging.getLogger(__name__)
SETTLEMENT = "settlement"


class LeaseLost(RuntimeError):
    """The lease is held by another worker (it expired under this one): stop before any side effect."""


@dataclass(frozen=True, slots=True)
class LeaseState:
    """Who holds a lease and until when (database clock, seconds since the epoch)."""

    name: str
    holder: str
    expires_at: float
    acquired_at: float


class SettlementLease:
    """The lease `name` for `holder`, valid `ttl_s` after each take or renewal."""

    def __init__(self, engine: Engine, holder: str, ttl_s: float, name: str = SETTLEMENT) -> None:
        if ttl_s <= 0:
            raise ValueError("a lease needs ttl_s > 0")
        self.engine = engine
        self.holder = holder
        self.ttl_s = ttl_s
        self.name = name

    def _now(self, conn: Connection) -> float:
        if conn.dialect.name == "postgresql":
            return float(conn.execute(select(func.extract("epoch", func.now()))).scalar_one())
        return time.time()

    def acquire(self) -> bool:
        """Take or renew the lease; False when another holder's lease has not expired."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            taken = conn.execute(
                update(settlement_lease)
                .where(
                    settlement_lease.c.name == self.name,
                    or_(settlement_lease.c.holder == self.holder, settlement_lease.c.expires_at < now),
                )
                .values(
                    holder=self.holder,
                    expires_at=now + self.ttl_s,
                    # A renewal keeps its acquired_at; a take-over starts a new one.
                    acquired_at=case(
                        (settlement_lease.c.holder == literal(self.holder), settlement_lease.c.acquired_at),
                        else_=literal(now),
                    ),
                )
            ).rowcount
            if taken == 1:
                return True
            exists = conn.execute(select(settlement_lease.c.name).where(settlement_lease.c.name == self.name)).first()
        if exists is not None:
            return False
        try:
            with self.engine.begin() as conn:
                now = self._now(conn)
                conn.execute(
                    insert(settlement_lease).values(
                        name=self.name, holder=self.holder, expires_at=now + self.ttl_s, acquired_at=now
                    )
                )
        except IntegrityError:  # another worker inserted it first
            return False
        return True

    def ensure(self) -> None:
        """Renew the lease or raise LeaseLost (called before each side effect of a settle pass)."""
        if not self.acquire():
            state = self.state()
            raise LeaseLost(f"settlement lease {self.name} is held by {state.holder if state else 'nobody'}")

    def release(self) -> None:
        """Give the lease up now (a clean stop), so another worker need not wait for the expiry."""
        with self.engine.begin() as conn:
            conn.execute(
                delete(settlement_lease).where(
                    settlement_lease.c.name == self.name, settlement_lease.c.holder == self.holder
                )
            )

    def state(self) -> LeaseState | None:
        with self.engine.begin() as conn:
            row = conn.execute(select(settlement_lease).where(settlement_lease.c.name == self.name)).first()
        return None if row is None else LeaseState(row.name, row.holder, row.expires_at, row.acquired_at)
