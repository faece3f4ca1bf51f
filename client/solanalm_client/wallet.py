"""Wallet side of the SDK: Solana CLI keypair files, the SIWS signature, and deposit transactions.

The deposit transfer mirrors the server's `payments.deposits.deposit_instruction` (a system transfer for
SOL, a checked SPL transfer between associated token accounts otherwise), written here with solders alone
so the SDK needs neither the server packages nor solana-py's `spl`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from solders.hash import Hash
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction

from solanalm_client.errors import KeypairError, SolanaLMError
from solanalm_client.models import DepositInfo

TOKEN_PROGRAM_ID = Pubkey.from_string("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA")
ASSOCIATED_TOKEN_PROGRAM_ID = Pubkey.from_string("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL")
_TRANSFER_CHECKED = 12  # the SPL token program's instruction index


def load_keypair(path: str | Path) -> Keypair:
    """A Solana CLI keypair file (`solana-keygen new -o PATH`: a JSON array of 64 bytes)."""
    where = Path(path).expanduser()
    try:
        text = where.read_text()
    except FileNotFoundError:
        raise KeypairError(f"no keypair file at {where}", code="keypair_not_found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeypairError(f"cannot read the keypair file {where}: {exc}", code="keypair_unreadable") from None
    return parse_keypair(text, str(where))


def parse_keypair(text: str, source: str = "keypair") -> Keypair:
    """The keypair of a Solana CLI keypair file's text; a KeypairError saying what is wrong otherwise."""
    expected = f"{source} is not a Solana CLI keypair file (a JSON array of 64 integers 0-255)"
    try:
        values = json.loads(text)
    except ValueError:
        raise KeypairError(expected + ": not JSON", code="invalid_keypair") from None
    if not isinstance(values, list) or len(values) != 64:
        size = len(values) if isinstance(values, list) else type(values).__name__
        raise KeypairError(f"{expected}: got {size}", code="invalid_keypair")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise KeypairError(expected + ": a value is not an integer 0-255", code="invalid_keypair")
    try:
        keypair = Keypair.from_bytes(bytes(values))
    except ValueError as exc:
        message = f"{source}: the secret and public halves do not match ({exc})"
        raise KeypairError(message, code="invalid_keypair") from None
    return keypair


def as_keypair(keypair: Keypair | str | Path) -> Keypair:
    return keypair if isinstance(keypair, Keypair) else load_keypair(keypair)


def sign_message(keypair: Keypair, message: str) -> str:
    """The base58 ed25519 signature of the message's UTF-8 bytes (what POST /v1/auth/verify checks)."""
    return str(keypair.sign_message(message.encode()))


def associated_token_address(owner: Pubkey, mint: Pubkey) -> Pubkey:
    seeds = [bytes(owner), bytes(TOKEN_PROGRAM_ID), bytes(mint)]
    return Pubkey.find_program_address(seeds, ASSOCIATED_TOKEN_PROGRAM_ID)[0]


def deposit_instruction(payer: Pubkey, info: DepositInfo, amount: int) -> Instruction:
    """Transfer `amount` base units of the network's asset from `payer` to its treasury."""
    if amount <= 0:
        raise SolanaLMError(f"a deposit must be a positive amount, got {amount}", code="invalid_amount", param="amount")
    treasury = Pubkey.from_string(info.treasury)
    if info.mint is None:
        return transfer(TransferParams(from_pubkey=payer, to_pubkey=treasury, lamports=amount))
    mint = Pubkey.from_string(info.mint)
    accounts = [
        AccountMeta(associated_token_address(payer, mint), is_signer=False, is_writable=True),
        AccountMeta(mint, is_signer=False, is_writable=False),
        AccountMeta(associated_token_address(treasury, mint), is_signer=False, is_writable=True),
        AccountMeta(payer, is_signer=True, is_writable=False),
    ]
    data = struct.pack("<BQB", _TRANSFER_CHECKED, amount, info.decimals)
    return Instruction(TOKEN_PROGRAM_ID, data, accounts)


def deposit_transaction(keypair: Keypair, info: DepositInfo, amount: int, blockhash: str | None = None) -> bytes:
    """The signed deposit transaction (on `info.blockhash` unless another recent one is given)."""
    ix = deposit_instruction(keypair.pubkey(), info, amount)
    recent = Hash.from_string(blockhash or info.blockhash)
    message = Message.new_with_blockhash([ix], keypair.pubkey(), recent)
    return bytes(Transaction([keypair], message, recent))


__all__ = [
    "as_keypair",
    "associated_token_address",
    "deposit_instruction",
    "deposit_transaction",
    "load_keypair",
    "parse_keypair",
    "sign_message",
]
