"""The settlement engine: aggregate unpaid earnings into batches and drive them onto the chain.

Every step commits its outcome to the ledger before the next side effect:

    create (shares -> batch, payee -> in flight)        [ledger]
    sign   (tx bytes, signature, last valid height)     [ledger]   <- stored BEFORE sending
    send   (same bytes every time: same signature)      [chain]
    sent                                                [ledger]
    confirm / fail (in flight -> paid / back to payee)  [ledger], after the chain says so

Recovery after a crash at any point re-runs the same machine from the stored state. An unknown
outcome is resolved by the signature status; a batch is re-signed (new blockhash, new signature)
only when the signature is still unknown, the *finalized* block height has passed the stored last
valid block height by `resign_margin_blocks`, and the treasury's history (getSignaturesForAddress)
shows no transaction with the batch's memo signed by one of its attempts. Behind a load-balanced RPC,
one node that lags (status "not found") next to one far ahead (a high height) cannot trigger a
re-sign of a batch that landed. So nothing is lost and nothing is paid twice.

A batch that fails on chain is taken apart (payments.chain.failures): the line the error names is
quarantined (left out of new batches, with a doubling back-off, visible in `pending`), the rest is
batched again in the same pass; if no line can be named, its lines are retried one per batch.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from spl.token.instructions import get_associated_token_address
from tqdm import tqdm

from payments import metrics
from payments.chain.base import SIGNATURES_PAGE_MAX, ChainBackend, SignatureStatus
from payments.chain.failures import blame
from payments.chain.lookup import LookupTables
from payments.chain.tx import (
    AssetSpec,
    BudgetSpec,
    PayoutLine,
    build_payout_tx,
    fit_lines,
    lookup_addresses,
    memo_text,
)
from payments.errors import ChainError
from payments.ledger.payees import payee_problem
from payments.ledger.payouts import BatchRow, PayoutBook
from payments.protocol import BatchReport

logger = logging.getLogger(__name__)

# Fault-injection seam: called with a step name between steps; tests make it raise (or os._exit).
CrashHook = Callable[[str], None]
CRASH_POINTS = ("after_create", "after_sign", "after_send", "after_sent", "before_confirm")


def _no_crash(_step: str) -> None:
    return None


# Called before every side effect of a pass (a batch created, signed, sent, expired); raises (LeaseLost) when
# this runner may no longer settle: another worker took the settlement lease over.
LeaseGuard = Callable[[], None]


def _no_guard() -> None:
    return None


@dataclass(frozen=True, slots=True)
class KillProcessAt:
    """Fault injection: kill this process (os._exit) at `step`, once per `marker` file.

    Picklable, so integration tests can hand it to the Ray actor; the marker keeps the restarted
    actor (same constructor arguments) from dying again at the same step.
    """

    step: str
    marker: str

    def __call__(self, step: str) -> None:
        if step != self.step or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as fh:
            fh.write(step)
            fh.flush()
            os.fsync(fh.fileno())
        os._exit(137)


@dataclass(frozen=True, slots=True)
class SettlerConfig:
    batch_max_transfers: int
    min_payout: int
    budget: BudgetSpec
    commitment: str = "confirmed"
    versioned: bool = False  # v0 transactions with address lookup tables
    resign_margin_blocks: int = 64  # finalized blocks past the last valid height before a re-sign
    history_search_limit: int = 5_000  # treasury signatures searched for a batch's memo
    quarantine_backoff_s: float = 3_600.0  # first wait of a quarantined payee; doubles per failure
    quarantine_backoff_max_s: float = 7 * 86_400.0


class Settler:
    """Drives payout batches from the ledger to the chain; safe to re-run after any crash."""

    def __init__(
        self,
        book: PayoutBook,
        chain: ChainBackend,
        treasury: Keypair,
        asset: AssetSpec,
        config: SettlerConfig,
        crash_hook: CrashHook = _no_crash,
        tables: LookupTables | None = None,
        guard: LeaseGuard = _no_guard,
    ) -> None:
        if config.versioned and tables is None:
            raise ValueError("versioned payouts need lookup tables")
        self.tables = tables
        self.book = book
        self.chain = chain
        self.treasury = treasury
        self.asset = asset
        self.config = config
        self.crash_hook = crash_hook
        self.guard = guard

    async def settle(self, max_batches: int = 100) -> BatchReport:
        """Finish open batches, then batch every payable unpaid earning; one pass."""
        self.guard()
        confirmed = paid = count = 0
        bar = self._progress(max_batches)
        singles: set[str] = set()  # wallets of a failed batch whose failing line was not named
        for batch in self.book.open_batches():
            c, p = await self._drive(batch)
            confirmed, paid, count = confirmed + c, paid + p, count + (len(batch.items) if c else 0)
            self._take_apart(batch.batch_id, singles)
            bar.update()
        held: set[str] = set()
        for _ in range(max_batches):
            lines, held = await self._select_lines(singles)
            if not lines:
                break
            self.guard()
            created = self.book.create_batch([str(line.wallet) for line in lines])
            if created is None:
                break
            self.crash_hook("after_create")
            c, p = await self._drive(created)
            confirmed, paid, count = (
                confirmed + c,
                paid + p,
                count + (len(created.items) if c else 0),
            )
            bar.update()
            if not c and not self._take_apart(created.batch_id, singles):
                break  # pending, or the treasury cannot pay: retry on the next pass, do not burn fees now
        bar.close()
        pending = len(self.book.open_batches())
        report = BatchReport(confirmed, count, paid, pending, len(held))
        metrics.record_settle_pass(report, sum(self.book.unpaid().values()))
        return report

    def _progress(self, max_batches: int) -> tqdm:
        """A progress bar over this pass's batches on a terminal (a catch-up can be long); silent elsewhere."""
        wallets = len(self.book.unpaid())
        expected = len(self.book.open_batches()) + -(-wallets // max(1, self.config.batch_max_transfers))
        return tqdm(total=min(expected, max_batches), desc="payout batches", unit="batch", disable=None, leave=False)

    async def recover(self) -> BatchReport:
        """Finish only the batches a previous run left open (the restart path)."""
        self.guard()
        confirmed = paid = count = 0
        for batch in self.book.open_batches():
            c, p = await self._drive(batch)
            confirmed, paid, count = confirmed + c, paid + p, count + (len(batch.items) if c else 0)
        report = BatchReport(confirmed, count, paid, len(self.book.open_batches()), 0)
        metrics.record_settle_pass(report)
        return report

    def _take_apart(self, batch_id: str, singles: set[str]) -> bool:
        """After a batch failed on chain, quarantine the line to blame; False when it was not a
        failure, or the treasury's own (nothing to retry in this pass)."""
        batch = self.book.get(batch_id)
        if batch.state != "failed":
            return False
        error = self.book.error_of(batch_id) or ""
        wallets = [w for w, _ in batch.items]
        found = blame(error, batch.tx_bytes, wallets, self.treasury.pubkey(), self.asset)
        if found.kind == "treasury":
            logger.error("batch %s failed on the treasury's side (%s); not quarantining anyone", batch_id, error)
            return False
        wallet = found.wallet if found.kind == "line" else (wallets[0] if len(wallets) == 1 else None)
        if wallet is None:
            logger.warning("batch %s failed (%s) naming no line: retrying its lines singly", batch_id, error)
            singles.update(wallets)
            return True
        self._quarantine(wallet, batch_id, error)
        singles.discard(wallet)
        return True

    def _quarantine(self, wallet: str, batch_id: str | None, reason: str) -> None:
        q = self.book.quarantine(
            wallet, batch_id, reason, self.config.quarantine_backoff_s, self.config.quarantine_backoff_max_s
        )
        logger.warning(
            "payee %s quarantined (failure %d, %d unpaid, retry in %.0fs): %s",
            wallet,
            q.failures,
            q.unpaid,
            q.retry_at - q.quarantined_at,
            reason,
        )

    async def _select_lines(self, singles: set[str] | None = None) -> tuple[list[PayoutLine], set[str]]:
        singles = singles or set()
        candidates: list[PayoutLine] = []
        held: set[str] = set()
        unpaid = self.book.unpaid()
        blocked = self.book.blocked_wallets()
        for wallet in sorted(unpaid):
            if wallet in blocked:
                continue
            problem = payee_problem(wallet, frozenset({str(self.treasury.pubkey())}))
            if problem is not None:  # recorded before payees were checked, or by another path
                self._quarantine(wallet, None, f"not payable: {problem}")
                blocked.add(wallet)
        for wallet in sorted(singles & unpaid.keys() - blocked):
            line = await self._payable_line(Pubkey.from_string(wallet), unpaid[wallet])
            if line is not None:
                return [line], held  # one line per batch until the failing one is named
        for wallet, amount in sorted(unpaid.items()):
            if wallet in blocked:
                continue
            line = await self._payable_line(Pubkey.from_string(wallet), amount)
            if line is None:
                held.add(wallet)
            else:
                candidates.append(line)
            if len(candidates) >= self.config.batch_max_transfers:
                break
        n = (
            fit_lines(
                self.treasury,
                self.asset,
                candidates,
                "b" + "0" * 15,
                self.config.budget,
                self.config.batch_max_transfers,
                self.config.versioned,
            )
            if candidates
            else 0
        )
        return candidates[:n], held

    async def _payable_line(self, wallet: Pubkey, amount: int) -> PayoutLine | None:
        if amount < self.config.min_payout:
            return None
        if self.asset.mint is None:
            # A transfer that would create an account below rent exemption fails on chain: hold it.
            if await self.chain.lamports(wallet) == 0 and amount < await self.chain.rent_exempt_minimum(0):
                return None
            return PayoutLine(wallet, amount)
        ata = get_associated_token_address(wallet, self.asset.mint)
        return PayoutLine(wallet, amount, create_account=await self.chain.token_amount(ata) is None)

    async def _drive(self, batch: BatchRow) -> tuple[int, int]:
        """Advance one batch as far as the chain allows; returns (1, amount) once confirmed."""
        for _ in range(3):  # created -> signed -> sent -> (expired -> created) at most once per pass
            if batch.state == "created":
                self.guard()
                await self._sign(batch)
                self.crash_hook("after_sign")
                batch = self.book.get(batch.batch_id)
            if batch.state in ("signed", "sent"):
                outcome = await self._send_and_resolve(batch)
                if outcome == "confirmed":
                    return 1, sum(a for _, a in batch.items)
                if outcome in ("failed", "pending"):
                    return 0, 0
                batch = self.book.get(batch.batch_id)  # expired: re-sign
        return 0, 0

    async def _sign(self, batch: BatchRow) -> None:
        lines = [await self._line_for_item(w, a) for w, a in batch.items]
        tables = None
        if self.tables is not None and self.config.versioned:
            tables = await self.tables.ensure(lookup_addresses(self.asset, lines))
        blockhash, last_valid = await self.chain.latest_blockhash()
        tx = build_payout_tx(self.treasury, self.asset, lines, batch.batch_id, self.config.budget, blockhash, tables)
        self.book.mark_signed(batch.batch_id, bytes(tx), str(tx.signatures[0]), str(blockhash), last_valid)

    async def _line_for_item(self, wallet: str, amount: int) -> PayoutLine:
        pubkey = Pubkey.from_string(wallet)
        if self.asset.mint is None:
            return PayoutLine(pubkey, amount)
        ata = get_associated_token_address(pubkey, self.asset.mint)
        return PayoutLine(pubkey, amount, create_account=await self.chain.token_amount(ata) is None)

    async def _send_and_resolve(self, batch: BatchRow) -> str:
        """confirmed | failed | expired | pending, with the ledger updated accordingly."""
        if batch.tx_bytes is None or batch.signature is None:
            raise RuntimeError(f"batch {batch.batch_id} is {batch.state} without a stored transaction")
        signature = Signature.from_string(batch.signature)
        status = await self.chain.signature_status(signature)
        if status is None and batch.attempt > 1:
            # Re-signed once already: never send the new attempt if an earlier one landed after all.
            try:
                landed = await self._landed_attempt(batch)
            except ChainError as exc:
                logger.warning("batch %s: treasury history unreadable (%s); waiting", batch.batch_id, exc)
                return "pending"
            if landed is not None and landed != batch.signature:
                return await self._resolve_attempt(batch, landed)
        if status is None:
            self.guard()  # the last moment a runner that lost its lease can still stop
            try:
                await self.chain.send_raw(batch.tx_bytes)
            except ChainError as exc:
                logger.warning("batch %s send failed (%s); resolving by status", batch.batch_id, exc)
            self.crash_hook("after_send")
            if batch.state == "signed":
                self.book.mark_sent(batch.batch_id)
                self.crash_hook("after_sent")
            status = await self.chain.signature_status(signature)
        if status is None:
            return await self._expire_or_wait(batch)
        return self._resolve(batch, batch.signature, status)

    async def _expire_or_wait(self, batch: BatchRow) -> str:
        """The signature is unknown: re-sign only if it can no longer land and has not landed."""
        finalized = await self.chain.block_height("finalized")
        if finalized <= (batch.last_valid_block_height or 0) + self.config.resign_margin_blocks:
            return "pending"
        try:
            landed = await self._landed_attempt(batch)
        except ChainError as exc:
            logger.warning("batch %s: treasury history unreadable (%s); not re-signing yet", batch.batch_id, exc)
            return "pending"
        if landed is not None:
            logger.warning(
                "batch %s: the status lookup does not know %s but the treasury's history does; not re-signing",
                batch.batch_id,
                landed,
            )
            return await self._resolve_attempt(batch, landed)
        logger.info("batch %s: blockhash expired unconfirmed; re-signing", batch.batch_id)
        self.guard()
        self.book.mark_expired(batch.batch_id)
        return "expired"

    async def _landed_attempt(self, batch: BatchRow) -> str | None:
        """A signature of this batch's own attempts found with its memo in the treasury's history.

        Raises ChainError when the history cannot be read, or was not read back far enough to be
        sure: the caller then waits (never re-signs). Only the batch's own signatures count: anyone
        can put our memo in a transaction that touches the treasury (a deposit), which must not
        hold a batch back for ever.
        """
        memo = memo_text(batch.batch_id).decode()
        attempts = set(self.book.attempt_signatures(batch.batch_id))
        before: str | None = None
        searched = 0
        while searched < self.config.history_search_limit:
            page = await self.chain.signatures_for_address(self.treasury.pubkey(), before, SIGNATURES_PAGE_MAX)
            for entry in page:
                if entry.signature in attempts and memo in (entry.memo or ""):
                    return entry.signature
            if len(page) < SIGNATURES_PAGE_MAX:
                return None
            searched, before = searched + len(page), page[-1].signature
        raise ChainError(
            f"batch {batch.batch_id} not among the treasury's last {searched} transactions;"
            " raise payments.resign_history_limit to decide"
        )

    async def _resolve_attempt(self, batch: BatchRow, signature: str) -> str:
        status = await self.chain.signature_status(Signature.from_string(signature))
        if status is None:
            return "pending"  # a lagging status node: ask again on the next pass
        return self._resolve(batch, signature, status)

    def _resolve(self, batch: BatchRow, signature: str, status: SignatureStatus) -> str:
        if not status.reached(self.config.commitment):
            return "pending"
        self.crash_hook("before_confirm")
        if status.err is None:
            self.book.confirm(batch.batch_id, status.fee_lamports or 0, signature)
            logger.info("batch %s confirmed: %s", batch.batch_id, signature)
            return "confirmed"
        self.book.fail(batch.batch_id, status.fee_lamports or 0, status.err, signature)
        logger.error("batch %s failed on chain: %s", batch.batch_id, status.err)
        return "failed"
