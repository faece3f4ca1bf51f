"""In-process Solana runtime (solders.litesvm.LiteSVM), persisted so a restart keeps balances.

LiteSVM forgets everything when the process ends, and has no blocks. This backend therefore
snapshots the system- and token-owned accounts plus its own transaction history after every
transaction (atomic write + rename), and keeps a block-height counter that moves past a blockhash's
validity window whenever the blockhash is expired. The history is also what makes re-sending a
stored transaction after a restart a no-op instead of a second payment.
"""

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

from solders.account import Account
from solders.address_lookup_table_account import ID as ALT_PROGRAM_ID
from solders.hash import Hash
from solders.litesvm import LiteSVM
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import ID as SYSTEM_PROGRAM_ID
from solders.token.state import TokenAccount
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import FailedTransactionMetadata
from spl.token.constants import TOKEN_PROGRAM_ID

from payments.chain.base import (
    BLOCKHASH_VALIDITY_BLOCKS,
    EXPIRY_JUMP_BLOCKS,
    SIGNATURES_PAGE_MAX,
    FetchedTransaction,
    SignatureInfo,
    SignatureStatus,
)
from payments.chain.tx import memo_of
from payments.errors import ChainError

logger = logging.getLogger(__name__)
SNAPSHOT_VERSION = 1


class LiteSVMBackend:
    """A ChainBackend over an in-process LiteSVM; `state_path` None keeps it in memory only."""

    def __init__(self, state_path: Path | None = None) -> None:
        self.state_path = state_path
        self.svm = LiteSVM()
        self._fresh_blockhash = str(self.svm.latest_blockhash())
        self._height = 0
        self._txs: dict[str, dict[str, Any]] = {}
        if state_path is not None and state_path.exists():
            self._restore(state_path)

    # ChainBackend ---------------------------------------------------------------------------------
    async def latest_blockhash(self) -> tuple[Hash, int]:
        return self.svm.latest_blockhash(), self._height + BLOCKHASH_VALIDITY_BLOCKS

    async def block_height(self, commitment: str | None = None) -> int:
        return self._height  # every transaction is final as soon as it executes

    async def send_raw(self, tx: bytes) -> None:
        self.send_transaction(VersionedTransaction.from_bytes(tx))

    async def signature_status(self, signature: Signature) -> SignatureStatus | None:
        entry = self._txs.get(str(signature))
        if entry is None:
            return None
        return SignatureStatus(
            err=entry["err"],
            slot=int(entry["slot"]),
            confirmation="finalized",  # type: ignore[arg-type]
            fee_lamports=int(entry["fee"]),
        )  # type: ignore[call-overload]

    async def signatures_for_address(
        self, address: Pubkey, before: str | None = None, limit: int = SIGNATURES_PAGE_MAX
    ) -> list[SignatureInfo]:
        # The history of sent transactions this backend keeps (insertion order = execution order).
        entries = list(reversed(self._txs.items()))
        if before is not None:
            entries = entries[next((i + 1 for i, (sig, _) in enumerate(entries) if sig == before), len(entries)) :]
        found: list[SignatureInfo] = []
        for signature, entry in entries:
            tx = VersionedTransaction.from_bytes(base64.b64decode(str(entry["tx"])))
            if address not in tx.message.account_keys:
                continue
            found.append(SignatureInfo(signature, int(entry["slot"]), entry["err"], memo_of(tx)))
            if len(found) >= min(limit, SIGNATURES_PAGE_MAX):
                break
        return found

    async def fetch_transaction(self, signature: Signature) -> FetchedTransaction | None:
        entry = self._txs.get(str(signature))
        if entry is None:
            return None
        tx = VersionedTransaction.from_bytes(base64.b64decode(str(entry["tx"])))
        return FetchedTransaction(tx, entry["err"], int(entry["slot"]), True)  # type: ignore[arg-type, call-overload]

    async def lamports(self, address: Pubkey) -> int:
        return int(self.svm.get_balance(address) or 0)

    async def token_amount(self, token_account: Pubkey) -> int | None:
        account = self.svm.get_account(token_account)
        if account is None or account.owner != TOKEN_PROGRAM_ID:
            return None
        return int(TokenAccount.from_bytes(bytes(account.data)).amount)

    async def account_data(self, address: Pubkey) -> bytes | None:
        account = self.svm.get_account(address)
        return None if account is None else bytes(account.data)

    async def slot(self) -> int:
        return int(self.svm.get_clock().slot)

    async def wait_for_slot_after(self, slot: int) -> None:
        # LiteSVM has no clock of its own: move it forward.
        while self.svm.get_clock().slot <= slot:
            self.advance_slot()

    def advance_slot(self) -> None:
        """Move to the next slot and record it in SlotHashes (lookup tables need recent slots)."""
        slot = int(self.svm.get_clock().slot) + 1
        self.svm.warp_to_slot(slot)
        self.svm.set_slot_hashes([(slot, self.svm.latest_blockhash()), *self.svm.get_slot_hashes()][:512])
        self.save()

    async def rent_exempt_minimum(self, data_len: int) -> int:
        return int(self.svm.minimum_balance_for_rent_exemption(data_len))

    async def close(self) -> None:
        self.save()

    # Local runtime ------------------------------------------------------------------------------
    def send_transaction(self, tx: VersionedTransaction) -> Signature:
        """Execute a signed transaction now and persist the result; returns its signature."""
        signature = tx.signatures[0]
        if str(signature) in self._txs:
            return signature  # already processed (possibly before a restart): never execute twice
        result = self.svm.send_transaction(tx)
        if isinstance(result, FailedTransactionMetadata):
            err = str(result.err())
            if "AlreadyProcessed" in err:
                return signature
            if "BlockhashNotFound" in err or "SignatureFailure" in err or "AccountNotFound" in err:
                # Rejected before execution: nothing landed, no fee (a real cluster drops it).
                raise ChainError(f"transaction rejected: {err}")
            fee = int(result.meta().fee())
        else:
            err, fee = None, int(result.fee())
        self._txs[str(signature)] = {
            "tx": base64.b64encode(bytes(tx)).decode(),
            "err": err,
            "fee": fee,
            "slot": int(self.svm.get_clock().slot),
        }
        self.save()
        return signature

    def airdrop(self, address: Pubkey, lamports: int) -> None:
        result = self.svm.airdrop(address, lamports)
        if isinstance(result, FailedTransactionMetadata):
            raise ChainError(f"airdrop failed: {result.err()}")
        self.save()

    def expire_blockhash(self) -> None:
        """Move to a new blockhash; every earlier one is past its last valid height and the re-sign margin."""
        self.svm.expire_blockhash()
        self._height += EXPIRY_JUMP_BLOCKS
        self.save()

    # Persistence -------------------------------------------------------------------------------
    def save(self) -> None:
        if self.state_path is None:
            return
        accounts = {
            str(key): base64.b64encode(bytes(account)).decode()
            for owner in (SYSTEM_PROGRAM_ID, TOKEN_PROGRAM_ID, ALT_PROGRAM_ID)
            for key, account in self.svm.get_program_accounts(owner)
        }
        state = {
            "version": SNAPSHOT_VERSION,
            "height": self._height,
            "slot": int(self.svm.get_clock().slot),
            "blockhash": str(self.svm.latest_blockhash()),
            "accounts": accounts,
            "txs": self._txs,
        }
        tmp = self.state_path.with_suffix(".tmp")
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    def _restore(self, path: Path) -> None:
        state = json.loads(path.read_text())
        if state.get("version") != SNAPSHOT_VERSION:
            raise ChainError(f"{path}: unknown LiteSVM snapshot version {state.get('version')}")
        for key, raw in state["accounts"].items():
            self.svm.set_account(Pubkey.from_string(key), Account.from_bytes(base64.b64decode(raw)))
        self._txs = state["txs"]
        self._height = int(state["height"])
        if int(state["slot"]) > self.svm.get_clock().slot:
            self.svm.warp_to_slot(int(state["slot"]))  # lookup tables compare their slots with the clock
            self.svm.set_slot_hashes([(int(state["slot"]), self.svm.latest_blockhash())])
        if state["blockhash"] != self._fresh_blockhash:
            # The stored blockhash cannot be recreated: treat every earlier blockhash as expired.
            self._height += EXPIRY_JUMP_BLOCKS
        logger.info(
            "restored LiteSVM snapshot: %d accounts, %d transactions",
            len(state["accounts"]),
            len(self._txs),
        )
