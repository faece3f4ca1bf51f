"""The LiteSVM backend's snapshot: balances, history and block height survive a restart."""

import asyncio
from pathlib import Path

from solders.keypair import Keypair
from solders.message import Message
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction, VersionedTransaction

from payments.chain.base import BLOCKHASH_VALIDITY_BLOCKS
from payments.chain.litesvm_backend import LiteSVMBackend


def signed_transfer(backend: LiteSVMBackend, payer: Keypair, lamports: int) -> tuple[VersionedTransaction, Keypair]:
    dest = Keypair()
    blockhash = backend.svm.latest_blockhash()
    ix = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=dest.pubkey(), lamports=lamports))
    tx = Transaction([payer], Message.new_with_blockhash([ix], payer.pubkey(), blockhash), blockhash)
    return VersionedTransaction.from_legacy(tx), dest


def test_a_transaction_is_never_executed_twice_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "chain.json"
    backend = LiteSVMBackend(path)
    payer = Keypair()
    backend.airdrop(payer.pubkey(), 10**10)
    tx, dest = signed_transfer(backend, payer, 10**9)
    backend.send_transaction(tx)
    restarted = LiteSVMBackend(path)
    assert asyncio.run(restarted.lamports(dest.pubkey())) == 10**9
    asyncio.run(restarted.send_raw(bytes(tx)))  # a fresh LiteSVM would accept it again
    assert asyncio.run(restarted.lamports(dest.pubkey())) == 10**9
    status = asyncio.run(restarted.signature_status(tx.signatures[0]))
    assert status is not None and status.err is None and status.reached("finalized")


def test_expiry_moves_block_height_past_the_validity_window(tmp_path: Path) -> None:
    backend = LiteSVMBackend(tmp_path / "chain.json")
    _, last_valid = asyncio.run(backend.latest_blockhash())
    backend.expire_blockhash()
    assert asyncio.run(backend.block_height()) > last_valid
    restarted = LiteSVMBackend(tmp_path / "chain.json")
    # The new process cannot recreate the expired blockhash: heights move past it again.
    assert asyncio.run(restarted.block_height()) >= 2 * (BLOCKHASH_VALIDITY_BLOCKS + 1)
