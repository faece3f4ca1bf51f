"""JSON-RPC backend over solana-py's AsyncClient (devnet, mainnet or a local validator).

Transport and RPC errors are wrapped as ChainError in one place, the `_rpc` decorator (as solana-py's
`handle_async_exceptions` does). Transactions are sent with preflight skipped so
that the outcome is always decided on chain and read back through getSignatureStatuses.
"""

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

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
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _rpc(method: str) -> Callable[[Callable[_P, Awaitable[_R]]], Callable[_P, Coroutine[Any, Any, _R]]]:
    """Wrap a transport or RPC error raised by the decorated call as ChainError naming the RPC `method`."""

    def decorate(call: Callable[_P, Awaitable[_R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
        @functools.wraps(call)
        async def translated(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return await call(*args, **kwargs)
            except _TRANSPORT_ERRORS as exc:
                raise ChainError(f"{method} failed: {exc}") from exc

        return translated

    return decorate


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

    @_rpc("getLatestBlockhash")
    async def latest_blockhash(self) -> tuple[Hash, int]:
        value = (await self.client.get_latest_blockhash(self.commitment)).value
        return value.blockhash, int(value.last_valid_block_height)

    @_rpc("getBlockHeight")
    async def block_height(self, commitment: str | None = None) -> int:
        level = self.commitment if commitment is None else Commitment(commitment)
        return int((await self.client.get_block_height(level)).value)

    @_rpc("getSignaturesForAddress")
    async def signatures_for_address(
        self, address: Pubkey, before: str | None = None, limit: int = SIGNATURES_PAGE_MAX
    ) -> list[SignatureInfo]:
        resp = await self.client.get_signatures_for_address(
            address,
            before=None if before is None else Signature.from_string(before),
            limit=min(limit, SIGNATURES_PAGE_MAX),
            commitment=Commitment("confirmed"),  # the lowest this method accepts
        )
        return [
            SignatureInfo(str(s.signature), int(s.slot), None if s.err is None else str(s.err), s.memo)
            for s in resp.value
        ]

    @_rpc("sendTransaction")
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
        except _TRANSPORT_ERRORS as exc:  # a re-send of a transaction the chain already has is not a failure
            if "AlreadyProcessed" not in str(exc) and "already been processed" not in str(exc):
                raise

    @_rpc("getSignatureStatuses")
    async def signature_status(self, signature: Signature) -> SignatureStatus | None:
        resp = await self.client.get_signature_statuses([signature], search_transaction_history=True)
        status = resp.value[0]
        if status is None:
            return None
        confirmation = _confirmation(status.confirmation_status)
        fee = None
        if status.err is not None or confirmation != "processed":
            fee = await self._fee(signature)
        return SignatureStatus(None if status.err is None else str(status.err), int(status.slot), confirmation, fee)

    @_rpc("getTransaction")
    async def _fee(self, signature: Signature) -> int | None:
        resp = await self.client.get_transaction(
            signature,
            encoding="base64",
            commitment=self.commitment,
            max_supported_transaction_version=0,
        )
        if resp.value is None or resp.value.transaction.meta is None:
            return None
        return int(resp.value.transaction.meta.fee)

    @_rpc("getTransaction")
    async def fetch_transaction(self, signature: Signature) -> FetchedTransaction | None:
        resp = await self.client.get_transaction(
            signature,
            encoding="base64",
            commitment=Commitment("finalized"),
            max_supported_transaction_version=0,
        )
        if resp.value is None:
            return None
        encoded = resp.value.transaction
        meta = encoded.meta
        err = None if meta is None or meta.err is None else str(meta.err)
        # Queried at finalized commitment, so anything returned is final.
        return FetchedTransaction(encoded.transaction, err, int(resp.value.slot), True)  # type: ignore[arg-type]

    @_rpc("getBalance")
    async def lamports(self, address: Pubkey) -> int:
        return int((await self.client.get_balance(address, self.commitment)).value)

    @_rpc("getAccountInfo")
    async def token_amount(self, token_account: Pubkey) -> int | None:
        account = (await self.client.get_account_info(token_account, self.commitment)).value
        if account is None or account.owner != TOKEN_PROGRAM_ID:
            return None
        return int(TokenAccount.from_bytes(bytes(account.data)).amount)

    @_rpc("getAccountInfo")
    async def account_data(self, address: Pubkey) -> bytes | None:
        account = (await self.client.get_account_info(address, self.commitment)).value
        return None if account is None else bytes(account.data)

    @_rpc("getSlot")
    async def slot(self) -> int:
        return int((await self.client.get_slot(self.commitment)).value)

    async def wait_for_slot_after(self, slot: int, poll_s: float = 0.4, timeout_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while await self.slot() <= slot:
            if asyncio.get_running_loop().time() > deadline:
                raise ChainError(f"the chain did not pass slot {slot} within {timeout_s}s")
            await asyncio.sleep(poll_s)

    @_rpc("getMinimumBalanceForRentExemption")
    async def rent_exempt_minimum(self, data_len: int) -> int:
        return int((await self.client.get_minimum_balance_for_rent_exemption(data_len)).value)

    async def close(self) -> None:
        await self.client.close()
