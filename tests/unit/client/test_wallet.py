"""Keypair files and deposit transactions of the SDK, checked against solders and solana-py's spl."""

import json
from pathlib import Path

import pytest
from solanalm_client import KeypairError, SolanaLMError
from solanalm_client.models import DepositInfo
from solanalm_client.wallet import (
    associated_token_address,
    deposit_instruction,
    deposit_transaction,
    load_keypair,
    sign_message,
)
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import get_associated_token_address, transfer_checked
from spl.token.models import TransferCheckedParams

BLOCKHASH = "4vJ9JU1bJJE96FWSJKvHsmmFADCg4gpZQff4P3bkLKi"


def write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "id.json"
    path.write_text(content)
    return path


def test_a_solana_cli_keypair_file_loads_and_signs(tmp_path: Path) -> None:
    keypair = Keypair()
    loaded = load_keypair(write(tmp_path, json.dumps(list(bytes(keypair)))))
    assert loaded.pubkey() == keypair.pubkey()
    signature = Signature.from_string(sign_message(loaded, "hello"))
    assert signature.verify(keypair.pubkey(), b"hello")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("not json", "not JSON"),
        ('{"secret": 1}', "got dict"),
        (json.dumps([1] * 32), "got 32"),
        (json.dumps([256] * 64), "not an integer 0-255"),
        (json.dumps([True] * 64), "not an integer 0-255"),
        (json.dumps(list(bytes(Keypair()))[:32] + list(bytes(Keypair().pubkey()))), "do not match"),
    ],
)
def test_a_garbled_keypair_file_is_a_clear_error(tmp_path: Path, content: str, says: str) -> None:
    with pytest.raises(KeypairError) as caught:
        load_keypair(write(tmp_path, content))
    assert says in caught.value.message and caught.value.code == "invalid_keypair"


def test_a_missing_keypair_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(KeypairError) as caught:
        load_keypair(tmp_path / "nope.json")
    assert "nope.json" in caught.value.message and caught.value.code == "keypair_not_found"


def test_a_sol_deposit_is_a_system_transfer_to_the_treasury() -> None:
    payer, treasury = Keypair(), Keypair().pubkey()
    info = DepositInfo(str(treasury), None, 9, BLOCKHASH, "litesvm")
    expected = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=treasury, lamports=5_000))
    assert deposit_instruction(payer.pubkey(), info, 5_000) == expected
    tx = Transaction.from_bytes(deposit_transaction(payer, info, 5_000))
    tx.verify()
    assert str(tx.message.recent_blockhash) == BLOCKHASH


def test_an_spl_deposit_matches_spl_transfer_checked_between_associated_accounts() -> None:
    payer, treasury, mint = Keypair().pubkey(), Keypair().pubkey(), Keypair().pubkey()
    assert associated_token_address(payer, mint) == get_associated_token_address(payer, mint)
    expected = transfer_checked(
        TransferCheckedParams(
            program_id=TOKEN_PROGRAM_ID,
            source=get_associated_token_address(payer, mint),
            mint=mint,
            dest=get_associated_token_address(treasury, mint),
            owner=payer,
            amount=123_456,
            decimals=6,
        )
    )
    info = DepositInfo(str(treasury), str(mint), 6, BLOCKHASH, "rpc")
    assert deposit_instruction(payer, info, 123_456) == expected


def test_a_non_positive_deposit_is_refused_before_signing() -> None:
    info = DepositInfo(str(Pubkey.default()), None, 9, BLOCKHASH, "litesvm")
    with pytest.raises(SolanaLMError, match="positive"):
        deposit_instruction(Keypair().pubkey(), info, 0)
