"""Which line of a failed payout batch made it fail, read from the transaction error and its message.

A transaction fails as a whole. The runtime's error names the instruction that failed
(`InstructionError((index, ...))`) or, for rent, the account (`account_index: N`); both forms come back
the same from LiteSVM and from JSON-RPC (solders' TransactionError types). The failing instruction's
accounts name the payee: its wallet (SOL transfer, the owner of a created token account) or its
associated token account (SPL transfer). Errors that come from the treasury's side (not enough SOL or
tokens to pay, or to pay fees) blame no line: quarantining payees would not help.
"""

import re
from dataclasses import dataclass
from typing import Literal

from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction
from spl.token.instructions import get_associated_token_address

from payments.chain.tx import AssetSpec

_INSTRUCTION = re.compile(r"InstructionError\(\((\d+),")
_ACCOUNT = re.compile(r"account_index: (\d+)")
# System ResultWithNegativeLamports and SPL Token InsufficientFunds are both custom error 1.
_SOURCE_SHORT = re.compile(r"InstructionErrorCustom\(1\)\)|InsufficientFundsForFee")


@dataclass(frozen=True, slots=True)
class Blame:
    """`line`: the payee `wallet` failed; `treasury`: the payer side; `unknown`: no line can be named."""

    kind: Literal["line", "treasury", "unknown"]
    wallet: str | None = None


def blame(error: str, tx_bytes: bytes | None, items: list[str], treasury: Pubkey, asset: AssetSpec) -> Blame:
    """Who made a payout transaction with `items` (payee wallets) fail with `error`."""
    if _SOURCE_SHORT.search(error):
        return Blame("treasury")
    if tx_bytes is None:
        return Blame("unknown")
    message = VersionedTransaction.from_bytes(tx_bytes).message
    keys = list(message.account_keys)  # v0: accounts loaded from lookup tables are not named here
    owners = {wallet: wallet for wallet in items}
    if asset.mint is not None:
        owners |= {str(get_associated_token_address(Pubkey.from_string(w), asset.mint)): w for w in items}
    candidates: list[int] = []
    if (found := _INSTRUCTION.search(error)) is not None and int(found[1]) < len(message.instructions):
        candidates = list(bytes(message.instructions[int(found[1])].accounts))
    elif (found := _ACCOUNT.search(error)) is not None:
        candidates = [int(found[1])]
    for index in candidates:
        if index >= len(keys):
            continue
        if keys[index] == treasury and len(candidates) == 1:
            return Blame("treasury")
        if (wallet := owners.get(str(keys[index]))) is not None:
            return Blame("line", wallet)
    return Blame("unknown")
