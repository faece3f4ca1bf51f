"""The ledger: holds, settlement records and deposits as double-entry postings over SQL."""

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, create_engine, event, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

from payments.errors import InsufficientBalance, InvalidRequest, NotFound, PaymentError
from payments.ledger import accounts as acct
from payments.ledger.accounts import Posting, apply_postings, balance_of
from payments.ledger.migrate import migrate
from payments.ledger.payees import payee_problem
from payments.ledger.schema import (
    deposits,
    holds,
    payout_batches,
    postings,
    settlement_shares,
    settlements,
)
from payments.pricing import BPS, Price, hold_amount, request_cost, split_cost
from payments.protocol import (
    Balance,
    Deposit,
    Hold,
    HoldRequest,
    HoldSweep,
    SettlementRecord,
    ShareLine,
    TrainingReward,
    UsageReport,
)

logger = logging.getLogger(__name__)
# SQLSTATEs PostgreSQL aborts a transaction with when it met a concurrent writer: serialization_failure,
# deadlock_detected. The transaction did nothing; running it again is safe.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def is_write_conflict(exc: BaseException) -> bool:
    """A transaction aborted because of a concurrent writer (PostgreSQL), or SQLite's busy timeout."""
    if not isinstance(exc, DBAPIError) or isinstance(exc, IntegrityError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate in RETRYABLE_SQLSTATES or "database is locked" in str(exc.orig)


# Each public write of the ledger is one transaction: on a write conflict it is rolled back whole and re-run.
retry_conflicts = retry(
    retry=retry_if_exception(is_write_conflict),
    stop=stop_after_attempt(8),
    wait=wait_random_exponential(multiplier=0.005, max=0.5),
    reraise=True,
)


@dataclass(frozen=True, slots=True)
class SplitPolicy:
    """Commissions in basis points of each request's cost."""

    network_bps: int
    proxy_bps: int


def make_engine(url: str, sqlite_synchronous: str = "FULL") -> Engine:
    """An engine for `url`; SQLite files get WAL and fsync so a commit survives a crash."""
    if sqlite_synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"sqlite_synchronous must be FULL or NORMAL, not {sqlite_synchronous}")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    # Pooled connections keep their PRAGMAs and avoid reopening the file per transaction.
    in_memory = url in ("sqlite://", "sqlite:///:memory:")
    pool_args = {} if in_memory else {"pool_size": 4, "max_overflow": 4}
    engine = create_engine(url, connect_args={"check_same_thread": False}, **pool_args)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    return engine


class Ledger:
    """Accounting over SQL. Every public method is one database transaction."""

    def __init__(self, engine: Engine, price_of: Callable[[str], Price], policy: SplitPolicy) -> None:
        self.engine = engine
        self.price_of = price_of
        self.policy = policy
        # Addresses never paid as payees (the treasury); their shares go to the network account.
        self.reserved_payees: frozenset[str] = frozenset()
        migrate(engine)  # alembic upgrade head (a pre-Alembic ledger is brought to migration 1 and stamped first)

    @classmethod
    def from_url(cls, url: str, price_of: Callable[[str], Price], policy: SplitPolicy) -> "Ledger":
        return cls(make_engine(url), price_of, policy)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One DB transaction (committed on exit, rolled back on any exception)."""
        with self.engine.begin() as conn:
            yield conn

    def post(self, conn: Connection, items: list[Posting]) -> None:
        apply_postings(conn, items)

    # Holds ---------------------------------------------------------------------------------
    @retry_conflicts
    def place_hold(self, req: HoldRequest) -> Hold:
        """Move (prompt + max_tokens) at the model price from the payer's balance to its hold."""
        amount = hold_amount(self.price_of(req.model), req.prompt_tokens, req.max_tokens)
        try:
            return self._place_hold(req, amount)
        except IntegrityError as exc:  # the same request id held at once through another worker
            raise InvalidRequest(f"request {req.request_id} already has a hold", code="duplicate_request") from exc

    def _place_hold(self, req: HoldRequest, amount: int) -> Hold:
        with self.transaction() as conn:
            if conn.execute(select(holds.c.request_id).where(holds.c.request_id == req.request_id)).first():
                raise InvalidRequest(f"request {req.request_id} already has a hold", code="duplicate_request")
            acct.ensure_accounts(conn, [acct.client(req.payer)])
            # Conditional debit: concurrent gateways on PostgreSQL cannot overdraw a balance.
            debited = conn.execute(
                update(acct.accounts)
                .where(
                    acct.accounts.c.name == acct.client(req.payer),
                    acct.accounts.c.balance >= amount,
                )
                .values(balance=acct.accounts.c.balance - amount)
            ).rowcount
            if debited != 1:
                available = balance_of(conn, acct.client(req.payer))
                raise InsufficientBalance(
                    f"balance {available} does not cover this request's maximum cost {amount}"
                    f" ({req.prompt_tokens} prompt + {req.max_tokens} max_tokens of {req.model});"
                    " deposit more or lower max_tokens"
                )
            # The debit above is the from-side; record the posting and credit the hold.
            hold_name = acct.held(req.payer)
            acct.ensure_accounts(conn, [hold_name])
            conn.execute(
                acct.postings.insert(),
                {
                    "ref": f"hold:{req.request_id}",
                    "kind": "hold",
                    "from_account": acct.client(req.payer),
                    "to_account": hold_name,
                    "amount": amount,
                    "created_at": time.time(),
                },
            )
            conn.execute(
                update(acct.accounts)
                .where(acct.accounts.c.name == hold_name)
                .values(balance=acct.accounts.c.balance + amount)
            )
            conn.execute(
                holds.insert(),
                {
                    "request_id": req.request_id,
                    "payer": req.payer,
                    "model": req.model,
                    "amount": amount,
                    "prompt_tokens": req.prompt_tokens,
                    "max_tokens": req.max_tokens,
                    "state": "open",
                    "created_at": time.time(),
                },
            )
            return Hold(req.request_id, req.payer, amount, balance_of(conn, acct.client(req.payer)))

    @retry_conflicts
    def release_hold(self, request_id: str) -> bool:
        """Return a failed request's whole hold to the payer; False if it was already released."""
        with self.transaction() as conn:
            row = conn.execute(select(holds).where(holds.c.request_id == request_id).with_for_update()).first()
            if row is None:
                raise NotFound(f"no hold for request {request_id}")
            if row.state == "released":
                return False
            if row.state == "settled":
                raise InvalidRequest(f"request {request_id} is already settled", code="already_settled")
            self.post(
                conn,
                [
                    Posting(
                        f"release:{request_id}",
                        "release",
                        acct.held(row.payer),
                        acct.client(row.payer),
                        row.amount,
                    )
                ],
            )
            conn.execute(update(holds).where(holds.c.request_id == request_id).values(state="released"))
            return True

    @retry_conflicts
    def sweep_holds(self, max_age_s: float, now: float | None = None) -> HoldSweep:
        """Release every hold open for longer than `max_age_s` to its payer: no request lives that long, so
        no gateway will settle it (a place_hold that committed after its caller timed out, a gateway that
        died mid-request). One transaction; the rows are locked where the database can (PostgreSQL)."""
        cutoff = (time.time() if now is None else now) - max_age_s
        with self.transaction() as conn:
            stale = conn.execute(
                select(holds).where(holds.c.state == "open", holds.c.created_at < cutoff).with_for_update()
            ).all()
            for row in stale:
                posting = Posting(
                    f"sweep:{row.request_id}", "release", acct.held(row.payer), acct.client(row.payer), row.amount
                )
                self.post(conn, [posting])
            if stale:
                conn.execute(
                    update(holds)
                    .where(holds.c.request_id.in_([row.request_id for row in stale]))
                    .values(state="released")
                )
        return HoldSweep(tuple(row.request_id for row in stale), sum(row.amount for row in stale))

    # Settlement records -------------------------------------------------------------------------
    @retry_conflicts
    def record_usage(self, reports: list[UsageReport]) -> list[SettlementRecord | PaymentError]:
        """Settle completed requests in one transaction (group commit); one result per report.

        A report for an already-settled request returns the existing record (retries are safe).
        """
        results: list[SettlementRecord | PaymentError] = []
        with self.transaction() as conn:
            ids = [r.request_id for r in reports]
            # Locked (PostgreSQL): a second worker settling or releasing the same request waits, then sees it settled.
            open_holds = {
                h.request_id: h
                for h in conn.execute(
                    select(holds).where(holds.c.request_id.in_(ids)).order_by(holds.c.request_id).with_for_update()
                )
            }
            rows, share_rows, items, seen = [], [], [], set()
            for report in reports:
                hold = open_holds.get(report.request_id)
                try:
                    if hold is None or report.request_id in seen:
                        raise NotFound(f"no hold for request {report.request_id}")
                    if hold.state == "settled":
                        results.append(self._load_record(conn, request_id=report.request_id))
                        continue
                    if hold.state != "open" or hold.payer != report.payer:
                        raise InvalidRequest(f"hold of request {report.request_id} is {hold.state}")
                    record = self._price_report(report, hold.amount)
                except PaymentError as exc:
                    results.append(exc)
                    continue
                seen.add(report.request_id)
                results.append(record)
                rows.append(_settlement_row(record))
                share_rows.extend(_share_rows(record))
                items.extend(_settlement_postings(record, hold.amount))
            if rows:
                conn.execute(settlements.insert(), rows)
                conn.execute(settlement_shares.insert(), share_rows)
                self.post(conn, _summarise(items, str(rows[0]["id"]) if len(rows) > 1 else None))
                conn.execute(
                    update(holds).where(holds.c.request_id.in_([r["request_id"] for r in rows])).values(state="settled")
                )
        return results

    @retry_conflicts
    def fund_rewards(self, ref: str, amount: int) -> int:
        """Put `amount` of the network's money into the rewards account, once per `ref` (the operator
        sends the same amount to the treasury on chain); returns what the account holds now."""
        if amount <= 0 or not ref:
            raise InvalidRequest("funding needs a reference and an amount > 0")
        posting_ref = f"fund:{ref}"[:96]
        with self.transaction() as conn:
            acct.lock_account(conn, acct.REWARDS)  # two workers funding the same ref: the second sees the first
            done = conn.execute(select(postings.c.id).where(postings.c.ref == posting_ref)).first()
            if done is None:
                self.post(conn, [Posting(posting_ref, "reward_funding", acct.CHAIN_INFLOW, acct.REWARDS, amount)])
            return balance_of(conn, acct.REWARDS)

    @retry_conflicts
    def record_rewards(self, rewards: list[TrainingReward]) -> list[SettlementRecord]:
        """Credit training rewards as payable earnings, once per (job, round, wallet).

        Rewards are drawn from the rewards account (`fund_rewards`); a batch whose new records would
        take it below zero is refused whole (InsufficientBalance, code `rewards_unfunded`): nothing
        of it is recorded.
        """
        results: list[SettlementRecord] = []
        new_total = 0
        with self.transaction() as conn:
            acct.lock_account(conn, acct.REWARDS)  # one reward batch at a time: no double record, no overdraw
            for reward in rewards:
                if reward.amount < 0:
                    raise InvalidRequest("a reward must be >= 0")
                request_id = f"reward:{reward.job}:{reward.round}:{reward.wallet}"
                if reward.amount == 0:
                    continue
                existing = conn.execute(select(settlements.c.id).where(settlements.c.request_id == request_id)).first()
                if existing is not None:
                    results.append(self._load_record(conn, request_id=request_id))
                    continue
                record = SettlementRecord(
                    settlement_id=f"rwd_{uuid.uuid4().hex[:24]}",
                    request_id=request_id,
                    payer=acct.REWARDS,
                    model=f"train:{reward.job}",
                    prompt_tokens=0,
                    completion_tokens=0,
                    price_prompt_per_1k=0,
                    price_completion_per_1k=0,
                    cost=reward.amount,
                    shares=(ShareLine(reward.wallet, "provider", reward.examples, reward.amount),),
                    created_at=time.time(),
                )
                conn.execute(settlements.insert(), _settlement_row(record))
                conn.execute(settlement_shares.insert(), _share_rows(record))
                self.post(
                    conn,
                    [
                        Posting(
                            f"reward:{record.settlement_id}",
                            "reward",
                            acct.REWARDS,
                            acct.payee(reward.wallet),
                            reward.amount,
                        )
                    ],
                )
                results.append(record)
                new_total += reward.amount
            # Checked after the postings, inside the transaction: on PostgreSQL the update holds the
            # account's row lock, so a concurrent batch cannot slip under the same balance.
            left = balance_of(conn, acct.REWARDS)
            if new_total and left < 0:
                raise InsufficientBalance(
                    f"reward batch of {new_total} exceeds the rewards account ({left + new_total} available);"
                    " nothing recorded, fund it first",
                    code="rewards_unfunded",
                )
        return results

    def _price_report(self, report: UsageReport, held_amount: int) -> SettlementRecord:
        if not report.providers:
            raise InvalidRequest("a usage report needs at least one provider")
        price = self.price_of(report.model)
        cost = request_cost(price, report.prompt_tokens, report.completion_tokens)
        if cost > held_amount:
            logger.warning(
                "request %s cost %d exceeds its hold %d; charging the hold",
                report.request_id,
                cost,
                held_amount,
            )
            cost = held_amount
        layers = [p.layers_served for p in report.providers]
        split = split_cost(
            cost,
            layers,
            self.policy.network_bps,
            self._proxy_bps(report),
            report.proxy_wallet is not None,
        )
        shares = [
            self._payee_share(report.request_id, p.wallet, "provider", p.layers_served, amount)
            for p, amount in zip(report.providers, split.providers, strict=True)
        ]
        shares.append(ShareLine(acct.NETWORK, "network", 0, split.network))
        if report.proxy_wallet is not None:
            shares.append(self._payee_share(report.request_id, report.proxy_wallet, "proxy", 0, split.proxy))
        return SettlementRecord(
            settlement_id=f"set_{uuid.uuid4().hex[:24]}",
            request_id=report.request_id,
            payer=report.payer,
            model=report.model,
            prompt_tokens=report.prompt_tokens,
            completion_tokens=report.completion_tokens,
            price_prompt_per_1k=price.prompt_per_1k,
            price_completion_per_1k=price.completion_per_1k,
            cost=cost,
            shares=tuple(shares),
            created_at=time.time(),
        )

    def _payee_share(self, request_id: str, wallet: str, role: str, layers: int, amount: int) -> ShareLine:
        """The share as recorded, or, for a wallet that cannot be paid, the network's share instead.

        The payer's charge does not change (the price is per token, whoever served it); the share
        stays in the treasury as network income, kept with its layer count.
        """
        problem = payee_problem(wallet, self.reserved_payees)
        if problem is None:
            return ShareLine(wallet, role, layers, amount)
        logger.warning(
            "request %s: %s wallet %r is %s; its share of %d goes to the network",
            request_id,
            role,
            wallet[:64],
            problem,
            amount,
        )
        return ShareLine(acct.NETWORK, "network", layers, amount)

    def _proxy_bps(self, report: UsageReport) -> int:
        """The proxy's commission: its own rate when the report names one, else the configured one."""
        bps = report.proxy_commission_bps
        if bps is None:
            return self.policy.proxy_bps
        if not 0 <= bps <= BPS // 2:
            raise InvalidRequest(f"proxy_commission_bps must be within 0..{BPS // 2}")
        return bps

    def _load_record(
        self, conn: Connection, *, request_id: str | None = None, settlement_id: str | None = None
    ) -> SettlementRecord:
        cond = settlements.c.request_id == request_id if request_id else settlements.c.id == settlement_id
        row = conn.execute(select(settlements).where(cond)).first()
        if row is None:
            raise NotFound(f"no settlement {settlement_id or request_id}")
        shares = conn.execute(
            select(settlement_shares)
            .where(settlement_shares.c.settlement_id == row.id)
            .order_by(settlement_shares.c.id)
        ).all()
        return SettlementRecord(
            settlement_id=row.id,
            request_id=row.request_id,
            payer=row.payer,
            model=row.model,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            price_prompt_per_1k=row.price_prompt_per_1k,
            price_completion_per_1k=row.price_completion_per_1k,
            cost=row.cost,
            shares=tuple(ShareLine(s.wallet, s.role, s.layers_served, s.amount) for s in shares),
            created_at=row.created_at,
        )

    def settlement(self, settlement_id: str) -> tuple[SettlementRecord, bool, tuple[str, ...]]:
        """A record, whether all its payouts are confirmed on chain, and their signatures."""
        with self.transaction() as conn:
            record = self._load_record(conn, settlement_id=settlement_id)
            batch_rows = conn.execute(
                select(settlement_shares.c.batch_id, payout_batches.c.state, payout_batches.c.signature)
                .select_from(
                    settlement_shares.outerjoin(payout_batches, settlement_shares.c.batch_id == payout_batches.c.id)
                )
                .where(
                    settlement_shares.c.settlement_id == settlement_id,
                    settlement_shares.c.role.in_(("provider", "proxy")),
                    settlement_shares.c.amount > 0,
                )
            ).all()
        settled = all(r.state == "confirmed" for r in batch_rows)
        signatures = tuple(sorted({r.signature for r in batch_rows if r.state == "confirmed"}))
        return record, settled, signatures

    # Deposits and balances ----------------------------------------------------------------------
    @retry_conflicts
    def credit_deposit(self, signature: str, wallet: str, amount: int, slot: int) -> Deposit:
        """Credit a verified deposit once; a second call with the same signature changes nothing."""
        if amount <= 0:
            raise InvalidRequest("a deposit must be positive")
        try:
            with self.transaction() as conn:
                conn.execute(
                    deposits.insert(),
                    {
                        "signature": signature,
                        "wallet": wallet,
                        "amount": amount,
                        "slot": slot,
                        "created_at": time.time(),
                    },
                )
                self.post(
                    conn,
                    [
                        Posting(
                            f"deposit:{signature}",
                            "deposit",
                            acct.CHAIN_INFLOW,
                            acct.client(wallet),
                            amount,
                        )
                    ],
                )
            return Deposit(signature, wallet, amount, newly_credited=True)
        except IntegrityError:
            with self.transaction() as conn:
                row = conn.execute(select(deposits).where(deposits.c.signature == signature)).one()
            return Deposit(signature, row.wallet, row.amount, newly_credited=False)

    def balance(self, wallet: str, asset: str) -> Balance:
        with self.transaction() as conn:
            return Balance(
                wallet=wallet,
                available=balance_of(conn, acct.client(wallet)),
                held=balance_of(conn, acct.held(wallet)),
                unpaid_earnings=balance_of(conn, acct.payee(wallet)),
                asset=asset,
            )


def _settlement_row(r: SettlementRecord) -> dict[str, object]:
    return {
        "id": r.settlement_id,
        "request_id": r.request_id,
        "payer": r.payer,
        "model": r.model,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "price_prompt_per_1k": r.price_prompt_per_1k,
        "price_completion_per_1k": r.price_completion_per_1k,
        "cost": r.cost,
        "created_at": r.created_at,
    }


def _share_rows(r: SettlementRecord) -> list[dict[str, object]]:
    return [
        {
            "settlement_id": r.settlement_id,
            "wallet": s.wallet,
            "role": s.role,
            "layers_served": s.layers_served,
            "amount": s.amount,
            "batch_id": None,
        }
        for s in r.shares
    ]


def _summarise(items: list[Posting], group_ref: str | None) -> list[Posting]:
    """One posting per (kind, from, to) for a group commit: a summarised journal entry.

    The per-request detail stays in `settlements`/`settlement_shares`; reconcile checks that the
    summarised charges equal the records. A group of one keeps its own reference.
    """
    if group_ref is None:
        return items
    totals: dict[tuple[str, str, str], int] = defaultdict(int)
    for p in items:
        totals[(p.kind, p.from_account, p.to_account)] += p.amount
    return [Posting(f"settle-group:{group_ref}", kind, src, dst, amount) for (kind, src, dst), amount in totals.items()]


def _settlement_postings(r: SettlementRecord, held_amount: int) -> list[Posting]:
    """Charge the hold: each share to its payee (or the network), the rest back to the client."""
    ref = f"settle:{r.settlement_id}"
    source = acct.held(r.payer)
    items = [
        Posting(
            ref,
            "charge",
            source,
            acct.NETWORK if s.role == "network" else acct.payee(s.wallet),
            s.amount,
        )
        for s in r.shares
    ]
    items.append(Posting(ref, "release", source, acct.client(r.payer), held_amount - r.cost))
    return items
