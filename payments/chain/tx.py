"""Payout transactions: many transfers per legacy transaction, with a Memo and a compute budget."""

from dataclasses import dataclass

from solders.address_lookup_table_account import AddressLookupTableAccount
from solders.compute_budget import set_compute_unit_limit, set_compute_unit_price
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction, VersionedTransaction
from spl.memo.constants import MEMO_PROGRAM_ID
from spl.memo.instructions import create_memo
from spl.memo.models import MemoParams
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    transfer_checked,
)
from spl.token.models import TransferCheckedParams

from payments.chain.base import PACKET_DATA_SIZE

# The runtime caps the instruction trace (top-level plus inner instructions) of a transaction at 64.
# Creating an associated token account traced 5 entries on LiteSVM (itself and 4 CPIs); a pre-funded
# address takes more CPIs (transfer, allocate, assign), so budget 6.
MAX_INSTRUCTION_TRACE_LENGTH = 64
ATA_CREATE_TRACE = 6


@dataclass(frozen=True, slots=True)
class AssetSpec:
    """What a payout moves: SOL (mint None) or an SPL token."""

    mint: Pubkey | None
    decimals: int = 9


@dataclass(frozen=True, slots=True)
class PayoutLine:
    """One transfer of a batch; `create_account` adds an idempotent ATA creation before it."""

    wallet: Pubkey
    amount: int
    create_account: bool = False


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    compute_unit_limit: int
    compute_unit_price_micro_lamports: int


def memo_text(batch_id: str) -> bytes:
    return f"solanalm:{batch_id}".encode()


def memo_of(tx: Transaction | VersionedTransaction) -> str | None:
    """The memos of a transaction as getSignaturesForAddress formats them ("[len] text; ..."), or None."""
    message = tx.message
    keys = list(message.account_keys)
    memos = [
        bytes(ix.data)
        for ix in message.instructions
        if ix.program_id_index < len(keys) and keys[ix.program_id_index] == MEMO_PROGRAM_ID
    ]
    if not memos:
        return None
    return "; ".join(f"[{len(m)}] {m.decode(errors='replace')}" for m in memos)


def payout_instructions(treasury: Pubkey, asset: AssetSpec, lines: list[PayoutLine]) -> list[Instruction]:
    ixs: list[Instruction] = []
    for line in lines:
        if asset.mint is None:
            ixs.append(transfer(TransferParams(from_pubkey=treasury, to_pubkey=line.wallet, lamports=line.amount)))
            continue
        if line.create_account:
            ixs.append(create_idempotent_associated_token_account(treasury, line.wallet, asset.mint))
        ixs.append(
            transfer_checked(
                TransferCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    source=get_associated_token_address(treasury, asset.mint),
                    mint=asset.mint,
                    dest=get_associated_token_address(line.wallet, asset.mint),
                    owner=treasury,
                    amount=line.amount,
                    decimals=asset.decimals,
                )
            )
        )
    return ixs


def lookup_addresses(asset: AssetSpec, lines: list[PayoutLine]) -> list[Pubkey]:
    """The per-payee accounts a v0 transaction loads from lookup tables."""
    if asset.mint is None:
        return [line.wallet for line in lines]
    out: list[Pubkey] = []
    for line in lines:
        out.append(get_associated_token_address(line.wallet, asset.mint))
        if line.create_account:
            out.append(line.wallet)
    return out


def build_payout_tx(
    treasury: Keypair,
    asset: AssetSpec,
    lines: list[PayoutLine],
    batch_id: str,
    budget: BudgetSpec,
    blockhash: Hash,
    tables: list[AddressLookupTableAccount] | None = None,
) -> Transaction | VersionedTransaction:
    """A signed transaction: compute budget, Memo(batch id), then one transfer per line.

    Legacy when `tables` is None; otherwise v0, loading payee accounts from the lookup tables.
    """
    ixs = [
        set_compute_unit_limit(budget.compute_unit_limit),
        set_compute_unit_price(budget.compute_unit_price_micro_lamports),
        create_memo(MemoParams(program_id=MEMO_PROGRAM_ID, signer=treasury.pubkey(), message=memo_text(batch_id))),
        *payout_instructions(treasury.pubkey(), asset, lines),
    ]
    if tables is not None:
        return VersionedTransaction(MessageV0.try_compile(treasury.pubkey(), ixs, tables, blockhash), [treasury])
    message = Message.new_with_blockhash(ixs, treasury.pubkey(), blockhash)
    return Transaction([treasury], message, blockhash)


def instruction_trace_length(lines: list[PayoutLine]) -> int:
    """Traced instructions, CPIs included: budget x2 + memo + transfers + ATA creations."""
    return 3 + len(lines) + ATA_CREATE_TRACE * sum(line.create_account for line in lines)


def fit_lines(
    treasury: Keypair,
    asset: AssetSpec,
    lines: list[PayoutLine],
    batch_id: str,
    budget: BudgetSpec,
    max_lines: int,
    versioned: bool = False,
) -> int:
    """How many of `lines` (in order) fit in one transaction of at most PACKET_DATA_SIZE bytes.

    For v0 the estimate assumes every payee account is in one lookup table.
    """
    count = 0
    for n in range(1, min(len(lines), max_lines) + 1):
        if instruction_trace_length(lines[:n]) > MAX_INSTRUCTION_TRACE_LENGTH:
            break
        tables = (
            [AddressLookupTableAccount(Pubkey.default(), lookup_addresses(asset, lines[:n]))] if versioned else None
        )
        size = len(bytes(build_payout_tx(treasury, asset, lines[:n], batch_id, budget, Hash.default(), tables)))
        if size > PACKET_DATA_SIZE:
            break
        count = n
    return count
