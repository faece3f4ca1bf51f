"""The settlement engine: aggregate unpaid earnings into batches and drive them onto the chain.

Every step commits its outcome to the ledger before the next side effect:

    create (shares -> batch, payee -> in flight)        [ledger]
    sign   (tx bytes, signature, last valid height)     [ledger]   <- stored BEFORE sending
    send   (same bytes every time: same signature)      [chain]
    sent                                                [ledger]
    confirm / fail (in flight -> paid / back to payee)  [ledger], after the chain says so

Recovery after a crash at any point re-runs the same machine from the stored state. An unknown
outcome is resolved by the signature status; a batch is re-signed (new blockhash, new signature)
only once the chain's block height has passed the stored last valid block height with the old
signature still unknown, when it can no longer land. So nothing is lost and nothing is paid twice.
"""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction
from spl.token.instructions import get_associated_token_address
from tqdm import tqdm

from payments import metrics
from payments.chain.base import ChainBackend
from payments.chain.lookup import LookupTables
from payments.chain.tx import (
    AssetSpec,
    BudgetSpec,
    PayoutLine,
    build_payout_tx,
    fit_lines,
    lookup_addresses,
)
from payments.errors import ChainError
from payments.ledger.payouts import BatchRow, PayoutBook
from payments.protocol import BatchReport

logger = logging.getLogger(__name__)

# Fault-injection seam: called with a step name between steps; tests make it raise (or os._exit).
CrashHook = Callable[[str], None]
CRASH_POINTS = ("after_create", "after_sign", "after_send", "after_sent", "before_confirm")


def _no_crash(_step: str) -> None:
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

    async def settle(self, max_batches: int = 100) -> BatchReport:
        """Finish open batches, then batch every payable unpaid earning; one pass."""
        confirmed = paid = count = 0
        bar = self._progress(max_batches)
        for batch in self.book.open_batches():
            c, p = await self._drive(batch)
            confirmed, paid, count = confirmed + c, paid + p, count + (len(batch.items) if c else 0)
            bar.update()
        held: set[str] = set()
        for _ in range(max_batches):
            lines, held = await self._select_lines()
            if not lines:
                break
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
            if not c:
                break  # failed or still pending: retry on the next pass, do not burn fees now
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
        confirmed = paid = count = 0
        for batch in self.book.open_batches():
            c, p = await self._drive(batch)
            confirmed, paid, count = confirmed + c, paid + p, count + (len(batch.items) if c else 0)
        report = BatchReport(confirmed, count, paid, len(self.book.open_batches()), 0)
        metrics.record_settle_pass(report)
        return report

    async def _select_lines(self) -> tuple[list[PayoutLine], set[str]]:
        candidates: list[PayoutLine] = []
        held: set[str] = set()
        for wallet, amount in sorted(self.book.unpaid().items()):
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
            if await self.chain.lamports(
                wallet
            ) == 0 and amount < await self.chain.rent_exempt_minimum(0):
                return None
            return PayoutLine(wallet, amount)
        ata = get_associated_token_address(wallet, self.asset.mint)
        return PayoutLine(wallet, amount, create_account=await self.chain.token_amount(ata) is None)

    async def _drive(self, batch: BatchRow) -> tuple[int, int]:
        """Advance one batch as far as the chain allows; returns (1, amount) once confirmed."""
        for _ in range(
            3
        ):  # created -> signed -> sent -> (expired -> created) at most once per pass
            if batch.state == "created":
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
        tx = build_payout_tx(
            self.treasury, self.asset, lines, batch.batch_id, self.config.budget, blockhash, tables
        )
        self.book.mark_signed(
            batch.batch_id, bytes(tx), str(tx.signatures[0]), str(blockhash), last_valid
        )

    async def _line_for_item(self, wallet: str, amount: int) -> PayoutLine:
        pubkey = Pubkey.from_string(wallet)
        if self.asset.mint is None:
            return PayoutLine(pubkey, amount)
        ata = get_associated_token_address(pubkey, self.asset.mint)
        return PayoutLine(pubkey, amount, create_account=await self.chain.token_amount(ata) is None)

    async def _send_and_resolve(self, batch: BatchRow) -> str:
        """confirmed | failed | expired | pending, with the ledger updated accordingly."""
        if batch.tx_bytes is None or batch.signature is None:
            raise RuntimeError(
                f"batch {batch.batch_id} is {batch.state} without a stored transaction"
            )
        signature = Signature.from_string(batch.signature)
        status = await self.chain.signature_status(signature)
        if status is None:
            try:
                await self.chain.send_raw(batch.tx_bytes)
            except ChainError as exc:
                logger.warning(
                    "batch %s send failed (%s); resolving by status", batch.batch_id, exc
                )
            self.crash_hook("after_send")
            if batch.state == "signed":
                self.book.mark_sent(batch.batch_id)
                self.crash_hook("after_sent")
            status = await self.chain.signature_status(signature)
        if status is None:
            if await self.chain.block_height() > (batch.last_valid_block_height or 0):
                logger.info("batch %s: blockhash expired unconfirmed; re-signing", batch.batch_id)
                self.book.mark_expired(batch.batch_id)
                return "expired"
            return "pending"
        if not status.reached(self.config.commitment):
            return "pending"
        self.crash_hook("before_confirm")
        if status.err is None:
            self.book.confirm(batch.batch_id, status.fee_lamports or 0)
            logger.info("batch %s confirmed: %s", batch.batch_id, batch.signature)
            return "confirmed"
        self.book.fail(batch.batch_id, status.fee_lamports or 0, status.err)
        logger.error("batch %s failed on chain: %s", batch.batch_id, status.err)
        return "failed"


def signed_transaction(batch: BatchRow) -> VersionedTransaction | None:
    """The stored signed transaction of a batch (legacy or v0), for inspection."""
    return VersionedTransaction.from_bytes(batch.tx_bytes) if batch.tx_bytes else None
