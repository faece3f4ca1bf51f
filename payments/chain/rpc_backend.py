"""JSON-RPC backend over solana-py's AsyncClient (devnet, mainnet or a local validator).

Transport and RPC errors are wrapped as ChainError. Transactions are sent with preflight skipped so
that the outcome is always decided on chain and read back through getSignatureStatuses.
"""

import asyncio
import logging

import httpx2
from solana.exceptions import SolanaRpcException
from solana.rpc.async_api import AsyncClient
from solana.rpc.commitment import Commitment
from solana.rpc.core import RPCException, RPCNoResultException
from solana.rpc.models import TxOpts
from solders.hash import Hash
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.token.state import TokenAccount
from solders.transaction_status import TransactionConfirmationStatus
from spl.token.constants import TOKEN_PROGRAM_ID

from payments.chain.base import SIGNATURES_PAGE_MAX, FetchedTransaction, SignatureInfo, SignatureStatus
from payments.errors import ChainError

logger = logging.getLogger(__name__)
_TRANSPORT_ERRORS = (
    RPCException,
    RPCNoResultException,
    SolanaRpcException,
    httpx2.HTTPError,
    OSError,
)


def _confirmation(status: TransactionConfirmationStatus | None) -> str:
    if status == TransactionConfirmationStatus.Finalized:
        return "finalized"
    if status == TransactionConfirmationStatus.Confirmed:
        return "confirmed"
    return "processed"


class RpcBackend:
    """A ChainBackend over JSON-RPC; `commitment` applies to reads and confirmations."""

    def __init__(self, url: str, commitment: str = "confirmed", timeout_s: float = 10.0) -> None:
        self.commitment = Commitment(commitment)
        self.client = AsyncClient(url, commitment=self.commitment, timeout=timeout_s)

    async def latest_blockhash(self) -> tuple[Hash, int]:
        try:
            value = (await self.client.get_latest_blockhash(self.commitment)).value
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getLatestBlockhash failed: {exc}") from exc
        return value.blockhash, int(value.last_valid_block_height)

    async def block_height(self, commitment: str | None = None) -> int:
        level = self.commitment if commitment is None else Commitment(commitment)
        try:
            return int((await self.client.get_block_height(level)).value)
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getBlockHeight failed: {exc}") from exc

    async def signatures_for_address(
        self, address: Pubkey, before: str | None = None, limit: int = SIGNATURES_PAGE_MAX
    ) -> list[SignatureInfo]:
        try:
            resp = await self.client.get_signatures_for_address(
                address,
                before=None if before is None else Signature.from_string(before),
                limit=min(limit, SIGNATURES_PAGE_MAX),
                commitment=Commitment("confirmed"),  # the lowest this method accepts
            )
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getSignaturesForAddress failed: {exc}") from exc
        return [
            SignatureInfo(str(s.signature), int(s.slot), None if s.err is None else str(s.err), s.memo)
            for s in resp.value
        ]

    async def send_raw(self, tx: bytes) -> None:
        try:
            await self.client.send_raw_transaction(
                tx,
                TxOpts(
                    skip_preflight=True,
                    skip_confirmation=True,
                    preflight_commitment=self.commitment,
                ),
            )
        except _TRANSPORT_ERRORS as exc:
            if "AlreadyProcessed" in str(exc) or "already been processed" in str(exc):
                return
            raise ChainError(f"sendTransaction failed: {exc}") from exc

    async def signature_status(self, signature: Signature) -> SignatureStatus | None:
        try:
            resp = await self.client.get_signature_statuses([signature], search_transaction_history=True)
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getSignatureStatuses failed: {exc}") from exc
        status = resp.value[0]
        if status is None:
            return None
        confirmation = _confirmation(status.confirmation_status)
        fee = None
        if status.err is not None or confirmation != "processed":
            fee = await self._fee(signature)
        return SignatureStatus(None if status.err is None else str(status.err), int(status.slot), confirmation, fee)

    async def _fee(self, signature: Signature) -> int | None:
        try:
            resp = await self.client.get_transaction(
                signature,
                encoding="base64",
                commitment=self.commitment,
                max_supported_transaction_version=0,
            )
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getTransaction failed: {exc}") from exc
        if resp.value is None or resp.value.transaction.meta is None:
            return None
        return int(resp.value.transaction.meta.fee)

    async def fetch_transaction(self, signature: Signature) -> FetchedTransaction | None:
        try:
            resp = await self.client.get_transaction(
                signature,
                encoding="base64",
                commitment=Commitment("finalized"),
                max_supported_transaction_version=0,
            )
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getTransaction failed: {exc}") from exc
        if resp.value is None:
            return None
        encoded = resp.value.transaction
        meta = encoded.meta
        err = None if meta is None or meta.err is None else str(meta.err)
        # Queried at finalized commitment, so anything returned is final.
        return FetchedTransaction(encoded.transaction, err, int(resp.value.slot), True)  # type: ignore[arg-type]

    async def lamports(self, address: Pubkey) -> int:
        try:
            return int((await self.client.get_balance(address, self.commitment)).value)
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getBalance failed: {exc}") from exc

    async def token_amount(self, token_account: Pubkey) -> int | None:
        try:
            account = (await self.client.get_account_info(token_account, self.commitment)).value
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getAccountInfo failed: {exc}") from exc
        if account is None or account.owner != TOKEN_PROGRAM_ID:
            return None
        return int(TokenAccount.from_bytes(bytes(account.data)).amount)

    async def account_data(self, address: Pubkey) -> bytes | None:
        try:
            account = (await self.client.get_account_info(address, self.commitment)).value
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getAccountInfo failed: {exc}") from exc
        return None if account is None else bytes(account.data)

    async def slot(self) -> int:
        try:
            return int((await self.client.get_slot(self.commitment)).value)
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getSlot failed: {exc}") from exc

    async def wait_for_slot_after(self, slot: int, poll_s: float = 0.4, timeout_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while await self.slot() <= slot:
            if asyncio.get_running_loop().time() > deadline:
                raise ChainError(f"the chain did not pass slot {slot} within {timeout_s}s")
            await asyncio.sleep(poll_s)

    async def rent_exempt_minimum(self, data_len: int) -> int:
        try:
            return int((await self.client.get_minimum_balance_for_rent_exemption(data_len)).value)
        except _TRANSPORT_ERRORS as exc:
            raise ChainError(f"getMinimumBalanceForRentExemption failed: {exc}") from exc

    async def close(self) -> None:
        await self.client.close()
