"""The treasury keypair and the LiteSVM bootstrap (funded treasury, default mint, token account)."""

import json
import logging
import os
from pathlib import Path

from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import Transaction, VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    initialize_mint2,
    mint_to_checked,
)
from spl.token.models import InitializeMint2Params, MintToCheckedParams

from payments.chain.litesvm_backend import LiteSVMBackend
from payments.chain.tx import AssetSpec
from payments.errors import PaymentError

logger = logging.getLogger(__name__)
MINT_SIZE = 82
TREASURY_FLOAT_LAMPORTS = 1_000 * 10**9  # LiteSVM only: SOL for fees and account rent


def load_or_create_keypair(path: Path) -> Keypair:
    """A Solana CLI keypair file (JSON array of 64 bytes), created with mode 0600 if missing."""
    if path.exists():
        try:
            return Keypair.from_bytes(bytes(json.loads(path.read_text())))
        except (ValueError, TypeError) as exc:
            raise PaymentError(f"{path}: not a Solana keypair file") from exc
    keypair = Keypair()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(list(bytes(keypair)), fh)
    logger.info("generated treasury keypair %s at %s", keypair.pubkey(), path)
    return keypair


def send_signed(backend: LiteSVMBackend, payer: Keypair, ixs: list, signers: list[Keypair]) -> None:  # type: ignore[type-arg]
    """Build, sign and execute a transaction on LiteSVM; raise on failure."""
    blockhash = backend.svm.latest_blockhash()
    tx = Transaction(signers, Message.new_with_blockhash(ixs, payer.pubkey(), blockhash), blockhash)
    signature = backend.send_transaction(VersionedTransaction.from_legacy(tx))
    status = backend._txs[str(signature)]
    if status["err"] is not None:
        raise PaymentError(f"LiteSVM transaction failed: {status['err']}")


def bootstrap_litesvm(
    backend: LiteSVMBackend,
    treasury: Keypair,
    asset: str,
    mint: str | None,
    decimals: int,
    state_dir: Path,
) -> AssetSpec:
    """Fund the treasury and, for SPL, create (once) the default mint and the treasury's account."""
    if (backend.svm.get_balance(treasury.pubkey()) or 0) < TREASURY_FLOAT_LAMPORTS // 2:
        backend.airdrop(treasury.pubkey(), TREASURY_FLOAT_LAMPORTS)
    if asset == "sol":
        return AssetSpec(mint=None, decimals=9)
    mint_pubkey = Pubkey.from_string(mint) if mint else _default_mint(backend, treasury, decimals, state_dir)
    ata = get_associated_token_address(treasury.pubkey(), mint_pubkey)
    if backend.svm.get_account(ata) is None:
        send_signed(
            backend,
            treasury,
            [create_idempotent_associated_token_account(treasury.pubkey(), treasury.pubkey(), mint_pubkey)],
            [treasury],
        )
    return AssetSpec(mint=mint_pubkey, decimals=decimals)


def _default_mint(backend: LiteSVMBackend, treasury: Keypair, decimals: int, state_dir: Path) -> Pubkey:
    mint_file = state_dir / "mint.json"
    if mint_file.exists():
        mint_pubkey = Pubkey.from_string(json.loads(mint_file.read_text())["mint"])
        if backend.svm.get_account(mint_pubkey) is not None:
            return mint_pubkey
    mint = Keypair()
    rent = backend.svm.minimum_balance_for_rent_exemption(MINT_SIZE)
    send_signed(
        backend,
        treasury,
        [
            create_account(
                CreateAccountParams(
                    from_pubkey=treasury.pubkey(),
                    to_pubkey=mint.pubkey(),
                    lamports=rent,
                    space=MINT_SIZE,
                    owner=TOKEN_PROGRAM_ID,
                )
            ),
            initialize_mint2(
                InitializeMint2Params(
                    decimals=decimals,
                    program_id=TOKEN_PROGRAM_ID,
                    mint=mint.pubkey(),
                    mint_authority=treasury.pubkey(),
                )
            ),
        ],
        [treasury, mint],
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    mint_file.write_text(json.dumps({"mint": str(mint.pubkey()), "decimals": decimals}))
    logger.info("created default mint %s", mint.pubkey())
    return mint.pubkey()


def faucet(backend: LiteSVMBackend, treasury: Keypair, asset: AssetSpec, owner: Pubkey, amount: int) -> None:
    """LiteSVM demo faucet: give `owner` SOL for fees and `amount` of the asset."""
    backend.airdrop(owner, 10**9 + (amount if asset.mint is None else 0))
    if asset.mint is None:
        return
    dest = get_associated_token_address(owner, asset.mint)
    send_signed(
        backend,
        treasury,
        [
            create_idempotent_associated_token_account(treasury.pubkey(), owner, asset.mint),
            mint_to_checked(
                MintToCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    mint=asset.mint,
                    dest=dest,
                    mint_authority=treasury.pubkey(),
                    amount=amount,
                    decimals=asset.decimals,
                )
            ),
        ],
        [treasury],
    )
