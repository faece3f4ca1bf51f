"""Payout transactions: many transfers per legacy transaction, with a Memo and a compute budget."""

from dataclasses import dataclass

from solders.compute_budget import set_compute_unit_limit, set_compute_unit_price
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction
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


@dataclass(frozen=True, slots=True)
class AssetSpec:
    """What a payout moves: SOL (mint None) or an SPL token."""

    mint: Pubkey | None
    decimals: int = 9

    @property
    def is_sol(self) -> bool:
        return self.mint is None


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


def payout_instructions(treasury: Pubkey, asset: AssetSpec, lines: list[PayoutLine]) -> list[Instruction]:
    ixs: list[Instruction] = []
    for line in lines:
        if asset.mint is None:
            ixs.append(transfer(TransferParams(from_pubkey=treasury, to_pubkey=line.wallet, lamports=line.amount)))
            continue
        if line.create_account:
            ixs.append(create_idempotent_associated_token_account(treasury, line.wallet, asset.mint))
        ixs.append(transfer_checked(TransferCheckedParams(
            program_id=TOKEN_PROGRAM_ID, source=get_associated_token_address(treasury, asset.mint),
            mint=asset.mint, dest=get_associated_token_address(line.wallet, asset.mint), owner=treasury,
            amount=line.amount, decimals=asset.decimals,
        )))
    return ixs


def build_payout_tx(treasury: Keypair, asset: AssetSpec, lines: list[PayoutLine], batch_id: str,
                    budget: BudgetSpec, blockhash: Hash) -> Transaction:
    """A signed legacy transaction: compute budget, Memo(batch id), then one transfer per line."""
    ixs = [
        set_compute_unit_limit(budget.compute_unit_limit),
        set_compute_unit_price(budget.compute_unit_price_micro_lamports),
        create_memo(MemoParams(program_id=MEMO_PROGRAM_ID, signer=treasury.pubkey(), message=memo_text(batch_id))),
        *payout_instructions(treasury.pubkey(), asset, lines),
    ]
    message = Message.new_with_blockhash(ixs, treasury.pubkey(), blockhash)
    return Transaction([treasury], message, blockhash)


def fit_lines(treasury: Keypair, asset: AssetSpec, lines: list[PayoutLine], batch_id: str,
              budget: BudgetSpec, max_lines: int) -> int:
    """How many of `lines` (in order) fit in one transaction of at most PACKET_DATA_SIZE bytes."""
    count = 0
    for n in range(1, min(len(lines), max_lines) + 1):
        size = len(bytes(build_payout_tx(treasury, asset, lines[:n], batch_id, budget, Hash.default())))
        if size > PACKET_DATA_SIZE:
            break
        count = n
    return count
