"""Payout batches in the ledger: the durable half of the settlement state machine.

A batch moves created -> signed -> sent -> confirmed | failed. Each step is committed before the
next side effect (signing, sending), so after a crash the stored state says exactly what may have
reached the chain: the signed transaction and its last valid block height are stored before sending.
"""

import time
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update

from payments.ledger import accounts as acct
from payments.ledger.accounts import Posting
from payments.ledger.ledger import Ledger
from payments.ledger.schema import (
    batch_attempts,
    payee_quarantine,
    payout_batches,
    payout_items,
    settlement_shares,
)

PAYEE_ROLES = ("provider", "proxy")
OPEN_STATES = ("created", "signed", "sent")


@dataclass(frozen=True, slots=True)
class BatchRow:
    """The stored state of one payout batch."""

    batch_id: str
    state: str
    attempt: int
    items: tuple[tuple[str, int], ...]
    tx_bytes: bytes | None
    signature: str | None
    last_valid_block_height: int | None


@dataclass(frozen=True, slots=True)
class QuarantinedPayee:
    """A payee left out of new batches until `retry_at` (its shares stay unpaid in the ledger)."""

    wallet: str
    unpaid: int
    reason: str
    batch_id: str | None
    failures: int
    quarantined_at: float
    retry_at: float


class BatchTaken(RuntimeError):
    """Another settlement runner moved the batch on first; this one must not send anything for it."""


class _NothingToPay(Exception):
    """Raised inside create_batch to roll back an empty batch."""


class PayoutBook:
    """Batch bookkeeping over a `Ledger`'s engine; every method is one transaction."""

    def __init__(self, ledger: Ledger, fees_in_ledger: bool) -> None:
        self.ledger = ledger
        # Fees are in the ledger's unit only when settling in SOL (SPL batches pay fees in SOL).
        self.fees_in_ledger = fees_in_ledger

    def unpaid(self) -> dict[str, int]:
        """Unpaid earnings per payee wallet (shares not yet in any batch)."""
        with self.ledger.transaction() as conn:
            rows = conn.execute(
                select(settlement_shares.c.wallet, func.sum(settlement_shares.c.amount))
                .where(
                    settlement_shares.c.batch_id.is_(None),
                    settlement_shares.c.role.in_(PAYEE_ROLES),
                )
                .group_by(settlement_shares.c.wallet)
            ).all()
        return {wallet: int(total) for wallet, total in rows if total > 0}

    def create_batch(self, wallets: list[str]) -> BatchRow | None:
        """Put every unpaid share of `wallets` into a new batch and move their total in flight."""
        batch_id = f"b{uuid.uuid4().hex[:15]}"
        now = time.time()
        try:
            self._create(batch_id, wallets, now)
        except _NothingToPay:
            return None
        return self.get(batch_id)

    def _create(self, batch_id: str, wallets: list[str], now: float) -> None:
        with self.ledger.transaction() as conn:
            conn.execute(
                payout_batches.insert(),
                {
                    "id": batch_id,
                    "state": "created",
                    "attempt": 0,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            conn.execute(
                update(settlement_shares)
                .where(
                    settlement_shares.c.batch_id.is_(None),
                    settlement_shares.c.role.in_(PAYEE_ROLES),
                    settlement_shares.c.wallet.in_(wallets),
                    settlement_shares.c.amount > 0,
                )
                .values(batch_id=batch_id)
            )
            totals = conn.execute(
                select(settlement_shares.c.wallet, func.sum(settlement_shares.c.amount))
                .where(settlement_shares.c.batch_id == batch_id)
                .group_by(settlement_shares.c.wallet)
                .order_by(settlement_shares.c.wallet)
            ).all()
            if not totals:
                raise _NothingToPay
            conn.execute(
                payout_items.insert(),
                [{"batch_id": batch_id, "wallet": w, "amount": int(a)} for w, a in totals],
            )
            self.ledger.post(
                conn,
                [Posting(f"batch:{batch_id}", "payout", acct.payee(w), acct.INFLIGHT, int(a)) for w, a in totals],
            )

    def get(self, batch_id: str) -> BatchRow:
        with self.ledger.transaction() as conn:
            row = conn.execute(select(payout_batches).where(payout_batches.c.id == batch_id)).one()
            items = conn.execute(
                select(payout_items.c.wallet, payout_items.c.amount)
                .where(payout_items.c.batch_id == batch_id)
                .order_by(payout_items.c.wallet)
            ).all()
        return BatchRow(
            row.id,
            row.state,
            row.attempt,
            tuple((w, int(a)) for w, a in items),
            row.tx_bytes,
            row.signature,
            row.last_valid_block_height,
        )

    def open_batches(self) -> list[BatchRow]:
        """Batches not yet confirmed or failed, oldest first (what recovery must finish)."""
        with self.ledger.transaction() as conn:
            ids = (
                conn.execute(
                    select(payout_batches.c.id)
                    .where(payout_batches.c.state.in_(OPEN_STATES))
                    .order_by(payout_batches.c.created_at)
                )
                .scalars()
                .all()
            )
        return [self.get(i) for i in ids]

    def mark_signed(
        self,
        batch_id: str,
        tx_bytes: bytes,
        signature: str,
        blockhash: str,
        last_valid_block_height: int,
    ) -> None:
        """Store the signed transaction before it is sent (the idempotency anchor)."""
        with self.ledger.transaction() as conn:
            attempt = conn.execute(
                select(payout_batches.c.attempt).where(payout_batches.c.id == batch_id).with_for_update()
            ).scalar_one()
            signed = conn.execute(
                update(payout_batches)
                .where(payout_batches.c.id == batch_id, payout_batches.c.state == "created")
                .values(
                    state="signed",
                    tx_bytes=tx_bytes,
                    signature=signature,
                    blockhash=blockhash,
                    last_valid_block_height=last_valid_block_height,
                    attempt=attempt + 1,
                    updated_at=time.time(),
                )
            ).rowcount
            if signed != 1:  # another runner signed it first: sending ours too could pay twice
                raise BatchTaken(f"batch {batch_id} is no longer created (signed by another settlement runner)")
            conn.execute(
                batch_attempts.insert(),
                {
                    "batch_id": batch_id,
                    "attempt": attempt + 1,
                    "signature": signature,
                    "last_valid_block_height": last_valid_block_height,
                },
            )

    def mark_sent(self, batch_id: str) -> None:
        self._set_state(batch_id, "sent", from_states=("signed",))

    def mark_expired(self, batch_id: str) -> None:
        """The blockhash expired with the signature unknown: the batch may be re-signed."""
        with self.ledger.transaction() as conn:
            row = conn.execute(select(payout_batches).where(payout_batches.c.id == batch_id)).one()
            conn.execute(
                update(batch_attempts)
                .where(batch_attempts.c.batch_id == batch_id, batch_attempts.c.attempt == row.attempt)
                .values(outcome="expired")
            )
            conn.execute(
                update(payout_batches)
                .where(payout_batches.c.id == batch_id)
                .values(
                    state="created",
                    tx_bytes=None,
                    signature=None,
                    blockhash=None,
                    last_valid_block_height=None,
                    updated_at=time.time(),
                )
            )

    def confirm(self, batch_id: str, fee_lamports: int, signature: str | None = None) -> None:
        """The transaction succeeded on chain: payouts leave the ledger, the fee is charged.

        `signature`: the attempt that landed, when it is not the batch's latest one.
        """
        batch = self._landed(batch_id, signature)
        with self.ledger.transaction() as conn:
            items = [Posting(f"batch:{batch_id}", "paid", acct.INFLIGHT, acct.CHAIN_OUTFLOW, a) for _, a in batch.items]
            if self.fees_in_ledger:
                items.append(Posting(f"batch:{batch_id}", "fee", acct.NETWORK, acct.CHAIN_FEES, fee_lamports))
            self.ledger.post(conn, items)
            self._finish(conn, batch, "confirmed", fee_lamports, None)
            # A payee paid after its back-off is payable again.
            conn.execute(delete(payee_quarantine).where(payee_quarantine.c.wallet.in_([w for w, _ in batch.items])))

    def fail(self, batch_id: str, fee_lamports: int, error: str, signature: str | None = None) -> None:
        """The transaction failed on chain: nothing was paid, shares become unpaid again."""
        batch = self._landed(batch_id, signature)
        with self.ledger.transaction() as conn:
            items = [Posting(f"batch:{batch_id}", "revert", acct.INFLIGHT, acct.payee(w), a) for w, a in batch.items]
            if self.fees_in_ledger:
                items.append(Posting(f"batch:{batch_id}", "fee", acct.NETWORK, acct.CHAIN_FEES, fee_lamports))
            self.ledger.post(conn, items)
            conn.execute(
                update(settlement_shares).where(settlement_shares.c.batch_id == batch_id).values(batch_id=None)
            )
            self._finish(conn, batch, "failed", fee_lamports, error)

    def _landed(self, batch_id: str, signature: str | None) -> BatchRow:
        """The batch, as of the attempt with `signature` (one of its own) when given."""
        batch = self.get(batch_id)
        if signature is None or signature == batch.signature:
            return batch
        with self.ledger.transaction() as conn:
            attempt = conn.execute(
                select(batch_attempts.c.attempt).where(
                    batch_attempts.c.batch_id == batch_id, batch_attempts.c.signature == signature
                )
            ).scalar_one()  # never a signature the batch was not signed with
        return BatchRow(
            batch.batch_id, batch.state, attempt, batch.items, None, signature, batch.last_valid_block_height
        )

    def _finish(self, conn, batch: BatchRow, state: str, fee: int, error: str | None) -> None:  # type: ignore[no-untyped-def]
        done = conn.execute(
            update(payout_batches)
            .where(payout_batches.c.id == batch.batch_id, payout_batches.c.state.in_(OPEN_STATES))
            .values(
                state=state,
                fee_lamports=fee,
                error=error,
                signature=batch.signature,
                attempt=batch.attempt,
                updated_at=time.time(),
            )
        ).rowcount
        if done != 1:
            raise RuntimeError(f"batch {batch.batch_id} was already finished")
        conn.execute(
            update(batch_attempts)
            .where(
                batch_attempts.c.batch_id == batch.batch_id,
                batch_attempts.c.attempt == batch.attempt,
            )
            .values(outcome=state)
        )

    def _set_state(self, batch_id: str, state: str, from_states: tuple[str, ...]) -> None:
        with self.ledger.transaction() as conn:
            conn.execute(
                update(payout_batches)
                .where(payout_batches.c.id == batch_id, payout_batches.c.state.in_(from_states))
                .values(state=state, updated_at=time.time())
            )

    def confirmed_batches(self) -> list[BatchRow]:
        with self.ledger.transaction() as conn:
            ids = conn.execute(select(payout_batches.c.id).where(payout_batches.c.state == "confirmed")).scalars().all()
        return [self.get(i) for i in ids]

    def attempt_signatures(self, batch_id: str) -> list[str]:
        """Every signature this batch was ever signed with (each stored before it was sent)."""
        with self.ledger.transaction() as conn:
            return list(
                conn.execute(
                    select(batch_attempts.c.signature)
                    .where(batch_attempts.c.batch_id == batch_id)
                    .order_by(batch_attempts.c.attempt)
                ).scalars()
            )

    def error_of(self, batch_id: str) -> str | None:
        """The chain's error of a failed batch."""
        with self.ledger.transaction() as conn:
            return conn.execute(select(payout_batches.c.error).where(payout_batches.c.id == batch_id)).scalar()

    # Quarantine -----------------------------------------------------------------------------------
    def quarantine(
        self, wallet: str, batch_id: str | None, reason: str, backoff_s: float, max_backoff_s: float
    ) -> QuarantinedPayee:
        """Leave `wallet` out of new batches; each further failure doubles the wait, up to the maximum."""
        now = time.time()
        with self.ledger.transaction() as conn:
            failures = 1 + int(
                conn.execute(select(payee_quarantine.c.failures).where(payee_quarantine.c.wallet == wallet)).scalar()
                or 0
            )
            conn.execute(delete(payee_quarantine).where(payee_quarantine.c.wallet == wallet))
            conn.execute(
                payee_quarantine.insert(),
                {
                    "wallet": wallet,
                    "reason": reason[:2_000],
                    "batch_id": batch_id,
                    "failures": failures,
                    "quarantined_at": now,
                    "retry_at": now + min(max_backoff_s, backoff_s * 2 ** (failures - 1)),
                },
            )
        return next(q for q in self.quarantined() if q.wallet == wallet)

    def quarantined(self) -> list[QuarantinedPayee]:
        """Every quarantined payee with what it is owed, oldest first."""
        unpaid = self.unpaid()
        with self.ledger.transaction() as conn:
            rows = conn.execute(select(payee_quarantine).order_by(payee_quarantine.c.quarantined_at)).all()
        return [
            QuarantinedPayee(
                r.wallet, unpaid.get(r.wallet, 0), r.reason, r.batch_id, r.failures, r.quarantined_at, r.retry_at
            )
            for r in rows
        ]

    def blocked_wallets(self) -> set[str]:
        """Quarantined payees whose back-off has not passed yet."""
        with self.ledger.transaction() as conn:
            return set(
                conn.execute(
                    select(payee_quarantine.c.wallet).where(payee_quarantine.c.retry_at > time.time())
                ).scalars()
            )

    def release_quarantine(self, wallet: str) -> bool:
        """The operator's call: retry `wallet` in the next pass (its failure count is kept)."""
        with self.ledger.transaction() as conn:
            return (
                conn.execute(
                    update(payee_quarantine).where(payee_quarantine.c.wallet == wallet).values(retry_at=0.0)
                ).rowcount
                == 1
            )
