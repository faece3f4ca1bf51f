"""Deposit verification: find the transfers to the treasury in a landed transaction."""

import struct

from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import get_associated_token_address

from payments.chain.base import FetchedTransaction
from payments.chain.tx import AssetSpec
from payments.errors import DepositRejected

SYSTEM_TRANSFER = 2
TOKEN_TRANSFER = 3
TOKEN_TRANSFER_CHECKED = 12


def deposit_of(fetched: FetchedTransaction, treasury: Pubkey, asset: AssetSpec) -> tuple[str, int]:
    """(sender, amount) of a final, successful transfer to the treasury; else DepositRejected."""
    if fetched.err is not None:
        raise DepositRejected(f"deposit transaction failed on chain: {fetched.err}")
    if not fetched.finalized:
        raise DepositRejected("deposit transaction is not finalized yet; retry later", code="not_finalized")
    tx = fetched.transaction
    message = tx.message
    signers = list(message.account_keys)[: message.header.num_required_signatures]
    if treasury in signers:
        # A payout (or any transaction the treasury signed) moves the network's own money.
        raise DepositRejected("a transaction signed by the treasury is not a deposit", code="treasury_signed")
    if isinstance(tx, VersionedTransaction) and isinstance(message, MessageV0) and message.address_table_lookups:
        raise DepositRejected("deposits using address lookup tables are not accepted")
    keys = list(message.account_keys)
    treasury_ata = get_associated_token_address(treasury, asset.mint) if asset.mint is not None else None
    senders: set[str] = set()
    total = 0
    for ix in message.instructions:
        program = keys[ix.program_id_index]
        accounts = [keys[i] for i in bytes(ix.accounts)]
        data = bytes(ix.data)
        found = _transfer_to(program, accounts, data, treasury, treasury_ata, asset)
        if found is not None:
            senders.add(str(found[0]))
            total += found[1]
    if total <= 0:
        raise DepositRejected("the transaction has no transfer of the settlement asset to the treasury")
    if len(senders) != 1:
        raise DepositRejected("a deposit transaction must come from a single wallet")
    sender = senders.pop()
    if sender == str(treasury):
        raise DepositRejected("a transfer from the treasury is not a deposit", code="treasury_signed")
    return sender, total


def _transfer_to(
    program: Pubkey,
    accounts: list[Pubkey],
    data: bytes,
    treasury: Pubkey,
    treasury_ata: Pubkey | None,
    asset: AssetSpec,
) -> tuple[Pubkey, int] | None:
    if asset.mint is None:
        if (
            program == SYSTEM_PROGRAM_ID
            and len(data) == 12
            and struct.unpack_from("<I", data)[0] == SYSTEM_TRANSFER
            and len(accounts) >= 2
            and accounts[1] == treasury
        ):
            return accounts[0], struct.unpack_from("<Q", data, 4)[0]
        return None
    if program != TOKEN_PROGRAM_ID or not data:
        return None
    if (
        data[0] == TOKEN_TRANSFER_CHECKED
        and len(data) >= 10
        and len(accounts) >= 4
        and accounts[2] == treasury_ata
        and accounts[1] == asset.mint
    ):
        return accounts[3], struct.unpack_from("<Q", data, 1)[0]
    if data[0] == TOKEN_TRANSFER and len(data) >= 9 and len(accounts) >= 3 and accounts[1] == treasury_ata:
        # The destination is the treasury's account of the settlement mint, so the mint is implied.
        return accounts[2], struct.unpack_from("<Q", data, 1)[0]
    return None
