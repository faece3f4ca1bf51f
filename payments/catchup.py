"""Payouts the chain made that the ledger does not know: the catch-up after a restore from a backup.

A restored ledger is as old as its backup. Batches created after it are unknown to it, and an open batch
may have landed through an attempt signed after it; the settlement machine would pay their shares again
(it trusts only its own recorded attempts, see `Settler._landed_attempt`). So before recovery the
treasury's history is read back (`history_search_limit` signatures) for successful transactions whose fee
payer is the treasury (only the treasury's key can make one: a deposit carrying our memo cannot pass) and
whose memo names a batch (`solanalm:<batch id>`):

- a batch the ledger has open, landed by an attempt it has no record of: that attempt is recorded and the
  batch confirmed, as the settlement machine would have;
- a batch the ledger has never seen: it is imported as confirmed. Each wallet it paid takes its unpaid
  shares in the restored ledger (they were in that batch when it was made: a batch pays all of a wallet's
  unpaid shares), and whatever it paid beyond them paid for records the restore lost. That excess is posted
  `unrecorded -> chain:unrecorded` and `reconcile` reports it (`payouts_all_recorded`, `unrecorded_payouts`).
"""

import logging
import struct
import time
from dataclasses import dataclass

from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import get_associated_token_address
from sqlalchemy import func, select, update

from payments.chain.base import SIGNATURES_PAGE_MAX, ChainBackend
from payments.chain.tx import AssetSpec
from payments.ledger import accounts as acct
from payments.ledger.accounts import Posting
from payments.ledger.payouts import OPEN_STATES, PAYEE_ROLES, PayoutBook
from payments.ledger.schema import batch_attempts, payout_batches, payout_items, settlement_shares

logger = logging.getLogger(__name__)

MEMO_PREFIX = "solanalm:"
SPL_TRANSFER, SPL_TRANSFER_CHECKED = 3, 12
SYSTEM_TRANSFER = 2


@dataclass(frozen=True, slots=True)
class CatchUpReport:
    confirmed: tuple[str, ...]  # open batches confirmed by an attempt the ledger had lost
    imported: tuple[str, ...]  # batches the ledger had never seen
    unrecorded_amount: int  # paid by imported batches beyond the shares the ledger has


async def catch_up(
    book: PayoutBook, chain: ChainBackend, treasury: Pubkey, asset: AssetSpec, history_limit: int
) -> CatchUpReport:
    """Adopt the treasury's landed payout transactions the ledger does not know (see the module doc)."""
    states = _batch_states(book)
    attempts = _attempt_signatures(book)
    confirmed: list[str] = []
    imported: list[str] = []
    unrecorded = 0
    before: str | None = None
    searched = 0
    while searched < history_limit:
        page = await chain.signatures_for_address(treasury, before, SIGNATURES_PAGE_MAX)
        for entry in reversed(page):  # oldest first: batches are adopted in the order they were paid
            batch_id = _batch_of(entry.memo)
            if batch_id is None or entry.err is not None or entry.signature in attempts:
                continue
            state = states.get(batch_id)
            if state is not None and state not in OPEN_STATES:
                continue  # confirmed or failed: the ledger already knows how it ended
            fetched = await chain.fetch_transaction(Signature.from_string(entry.signature))
            if fetched is None or fetched.err is not None or not _paid_by(fetched.transaction, treasury):
                continue
            if state is not None:
                _confirm_lost_attempt(book, batch_id, entry.signature)
                confirmed.append(batch_id)
            else:
                lines = await _transfers(fetched.transaction, chain, asset, treasury)
                unrecorded += _import(book, batch_id, entry.signature, lines, asset)
                imported.append(batch_id)
            states[batch_id] = "confirmed"
        if len(page) < SIGNATURES_PAGE_MAX:
            break
        searched, before = searched + len(page), page[-1].signature
    if confirmed or imported:
        logger.warning(
            "chain catch-up: confirmed %s, imported %s (%d paid for records the ledger lacks)",
            confirmed, imported, unrecorded,
        )  # fmt: skip
    return CatchUpReport(tuple(confirmed), tuple(imported), unrecorded)


def _batch_of(memo: str | None) -> str | None:
    """The batch id in a memo as the RPC formats it ("[len] solanalm:<id>")."""
    for part in (memo or "").split("; "):
        text = part.split("] ", 1)[-1]
        if text.startswith(MEMO_PREFIX):
            return text[len(MEMO_PREFIX) :]
    return None


def _paid_by(tx: object, treasury: Pubkey) -> bool:
    keys = list(tx.message.account_keys)  # type: ignore[attr-defined]
    return bool(keys) and keys[0] == treasury  # the fee payer signs: only the treasury's key makes this


async def _transfers(tx: object, chain: ChainBackend, asset: AssetSpec, treasury: Pubkey) -> list[tuple[Pubkey, int]]:
    """(destination, amount) of each transfer: the wallet for SOL, the token account for SPL."""
    message = tx.message  # type: ignore[attr-defined]
    keys = list(message.account_keys)
    if isinstance(message, MessageV0):
        keys += await _loaded_addresses(message, chain)
    out: list[tuple[Pubkey, int]] = []
    for ix in message.instructions:
        program, data, accounts = keys[ix.program_id_index], bytes(ix.data), list(ix.accounts)
        if asset.mint is None and program == SYSTEM_PROGRAM_ID and data[:4] == struct.pack("<I", SYSTEM_TRANSFER):
            out.append((keys[accounts[1]], struct.unpack("<Q", data[4:12])[0]))
        elif asset.mint is not None and program == TOKEN_PROGRAM_ID and data[:1] == bytes([SPL_TRANSFER_CHECKED]):
            out.append((keys[accounts[2]], struct.unpack("<Q", data[1:9])[0]))  # source, mint, dest, owner
        elif asset.mint is not None and program == TOKEN_PROGRAM_ID and data[:1] == bytes([SPL_TRANSFER]):
            out.append((keys[accounts[1]], struct.unpack("<Q", data[1:9])[0]))  # source, dest, owner
    return out


async def _loaded_addresses(message: object, chain: ChainBackend) -> list[Pubkey]:
    from solders.address_lookup_table_account import AddressLookupTable

    writable: list[Pubkey] = []
    readonly: list[Pubkey] = []
    for lookup in message.address_table_lookups:  # type: ignore[attr-defined]
        data = await chain.account_data(lookup.account_key)
        addresses = list(AddressLookupTable.deserialize(data).addresses) if data else []
        writable += [addresses[i] for i in lookup.writable_indexes]
        readonly += [addresses[i] for i in lookup.readonly_indexes]
    return writable + readonly  # the order the runtime appends them in


def _import(book: PayoutBook, batch_id: str, signature: str, lines: list[tuple[Pubkey, int]], asset: AssetSpec) -> int:
    """Record a batch the ledger never saw as confirmed; returns what it paid beyond the ledger's shares."""
    now = time.time()
    paid_to = {dest: amount for dest, amount in lines}
    total = sum(paid_to.values())
    with book.ledger.transaction() as conn:
        unpaid = conn.execute(
            select(settlement_shares.c.wallet, func.sum(settlement_shares.c.amount))
            .where(settlement_shares.c.batch_id.is_(None), settlement_shares.c.role.in_(PAYEE_ROLES))
            .group_by(settlement_shares.c.wallet)
        ).all()
        claimed: dict[str, int] = {}
        for wallet, amount in unpaid:
            dest = Pubkey.from_string(wallet)
            if asset.mint is not None:
                dest = get_associated_token_address(dest, asset.mint)
            if int(amount) > 0 and paid_to.get(dest, 0) >= int(amount):  # the batch took all its unpaid shares
                claimed[wallet] = int(amount)
        conn.execute(
            payout_batches.insert(),
            {"id": batch_id, "state": "confirmed", "attempt": 1, "signature": signature, "created_at": now,
             "updated_at": now, "error": None, "fee_lamports": 0},
        )  # fmt: skip
        conn.execute(
            batch_attempts.insert(),
            {"batch_id": batch_id, "attempt": 1, "signature": signature, "last_valid_block_height": 0,
             "outcome": "confirmed"},
        )  # fmt: skip
        if claimed:
            conn.execute(
                update(settlement_shares)
                .where(
                    settlement_shares.c.batch_id.is_(None),
                    settlement_shares.c.role.in_(PAYEE_ROLES),
                    settlement_shares.c.wallet.in_(list(claimed)),
                    settlement_shares.c.amount > 0,
                )
                .values(batch_id=batch_id)
            )
            conn.execute(
                payout_items.insert(), [{"batch_id": batch_id, "wallet": w, "amount": a} for w, a in claimed.items()]
            )
        ref = f"batch:{batch_id}"
        items = [Posting(ref, "payout", acct.payee(w), acct.INFLIGHT, a) for w, a in claimed.items()]
        items += [Posting(ref, "paid", acct.INFLIGHT, acct.CHAIN_OUTFLOW, a) for a in claimed.values()]
        excess = total - sum(claimed.values())
        if excess > 0:
            items.append(Posting(ref, "unrecorded", acct.UNRECORDED, acct.CHAIN_UNRECORDED, excess))
        book.ledger.post(conn, items)
    return excess


def _confirm_lost_attempt(book: PayoutBook, batch_id: str, signature: str) -> None:
    with book.ledger.transaction() as conn:
        attempt = (
            int(
                conn.execute(
                    select(func.max(batch_attempts.c.attempt)).where(batch_attempts.c.batch_id == batch_id)
                ).scalar()
                or 0
            )
            + 1
        )
        conn.execute(
            batch_attempts.insert(),
            {"batch_id": batch_id, "attempt": attempt, "signature": signature, "last_valid_block_height": 0},
        )
        conn.execute(
            update(payout_batches).where(payout_batches.c.id == batch_id).values(attempt=attempt, signature=signature)
        )
    book.confirm(batch_id, 0, signature)


def _batch_states(book: PayoutBook) -> dict[str, str]:
    with book.ledger.transaction() as conn:
        return dict(conn.execute(select(payout_batches.c.id, payout_batches.c.state)).all())  # type: ignore[arg-type]


def _attempt_signatures(book: PayoutBook) -> set[str]:
    with book.ledger.transaction() as conn:
        return set(conn.execute(select(batch_attempts.c.signature)).scalars().all())
