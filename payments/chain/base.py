"""The contract every chain backend implements (typed solders objects at the boundary)."""

from dataclasses import dataclass
from typing import Protocol

from solders.hash import Hash
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import Transaction, VersionedTransaction

# A blockhash is usable for this many blocks after the block that produced it (Solana's
# MAX_PROCESSING_AGE); LiteSVM has no blocks, so its backend advances its height by this on expiry.
BLOCKHASH_VALIDITY_BLOCKS = 150
# Most blocks past a last valid block height the settlement waits before re-signing (the setting
# payments.resign_margin_blocks is bounded by it); LiteSVM's expiry jumps past both.
RESIGN_MARGIN_MAX_BLOCKS = 150
EXPIRY_JUMP_BLOCKS = BLOCKHASH_VALIDITY_BLOCKS + RESIGN_MARGIN_MAX_BLOCKS + 1
# getSignaturesForAddress returns at most this many signatures per call.
SIGNATURES_PAGE_MAX = 1_000
# Largest serialized transaction (the IPv6 MTU minus headers).
PACKET_DATA_SIZE = 1232
COMMITMENT_RANK = {"processed": 0, "confirmed": 1, "finalized": 2}


@dataclass(frozen=True, slots=True)
class SignatureStatus:
    """What the chain knows about a signature: landed, with an error or not."""

    err: str | None
    slot: int
    confirmation: str  # processed | confirmed | finalized
    fee_lamports: int | None = None

    def reached(self, commitment: str) -> bool:
        """Whether the transaction is at least as committed as `commitment`."""
        return COMMITMENT_RANK[self.confirmation] >= COMMITMENT_RANK[commitment]


@dataclass(frozen=True, slots=True)
class FetchedTransaction:
    """A landed transaction with its outcome, for deposit verification."""

    transaction: Transaction | VersionedTransaction
    err: str | None
    slot: int
    finalized: bool


@dataclass(frozen=True, slots=True)
class SignatureInfo:
    """One entry of an address's transaction history, newest first (getSignaturesForAddress)."""

    signature: str
    slot: int
    err: str | None
    memo: str | None  # as the RPC formats it: "[len] text" per memo instruction, joined by "; "


class ChainBackend(Protocol):
    """A Solana cluster as the settlement engine sees it; errors are raised as ChainError."""

    async def latest_blockhash(self) -> tuple[Hash, int]:
        """The latest blockhash and its last valid block height."""

    async def block_height(self, commitment: str | None = None) -> int:
        """The current block height at `commitment` (None: the configured commitment)."""

    async def send_raw(self, tx: bytes) -> None:
        """Submit a signed transaction; re-submitting an already processed one is not an error."""

    async def signature_status(self, signature: Signature) -> SignatureStatus | None:
        """The status of a signature, or None when the chain has not seen it."""

    async def signatures_for_address(
        self, address: Pubkey, before: str | None = None, limit: int = SIGNATURES_PAGE_MAX
    ) -> list[SignatureInfo]:
        """Up to `limit` signatures of transactions that loaded `address`, newest first, older than `before`."""

    async def fetch_transaction(self, signature: Signature) -> FetchedTransaction | None:
        """A landed transaction (for deposits), or None."""

    async def lamports(self, address: Pubkey) -> int:
        """SOL balance in lamports (0 for a missing account)."""

    async def token_amount(self, token_account: Pubkey) -> int | None:
        """Balance of an SPL token account, or None when it does not exist."""

    async def account_data(self, address: Pubkey) -> bytes | None:
        """Raw data of an account, or None when it does not exist."""

    async def slot(self) -> int:
        """The current slot at the configured commitment."""

    async def wait_for_slot_after(self, slot: int) -> None:
        """Return once the chain is past `slot` (lookup-table entries activate the slot after)."""

    async def rent_exempt_minimum(self, data_len: int) -> int:
        """Lamports that make an account of `data_len` bytes rent exempt."""

    async def close(self) -> None:
        """Release connections and persist state."""
