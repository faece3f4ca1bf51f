"""HTTP routes of payments, as an APIRouter the gateway mounts:

    from payments.http import build_router
    app.include_router(build_router(lambda: payments_client))

Routes raise `PaymentError`; the app's error handler renders it as OpenAI error JSON
{"error": {"message", "type", "param", "code"}} (the gateway's `install_error_handlers`, or
`cluster.openai_errors.install_border_errors` on a bare app). The caller's API key is the bearer token
(`HTTPBearer`); without one, `authenticate(None)` answers (the open wallet in open mode, else 401).
"""

import base64
import binascii
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from payments.errors import InvalidRequest
from payments.protocol import (
    ApiKeyInfo,
    DepositRequest,
    PaymentsAPI,
    Receipt,
    ReceiptQuery,
    SignIn,
    WalletIdentity,
)

Payments = Callable[[], PaymentsAPI]  # the router's handle on payments, called per request
# The request's bearer token (None without one: `authenticate` decides, so open mode needs no key).
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]


class ChallengeBody(BaseModel):
    wallet: str = Field(description="Base58 wallet address that will sign in.", min_length=32, max_length=44)


class VerifyBody(BaseModel):
    message: str = Field(description="The challenge message, exactly as issued.", max_length=2_000)
    signature: str = Field(description="Base58 ed25519 signature of the message bytes.", max_length=100)
    ttl_s: int | None = Field(
        default=None,
        ge=1,
        le=400 * 86_400,
        description="Lifetime of the key, seconds; at most payments.api_key_ttl_s (None: that).",
    )


class DepositBody(BaseModel):
    signature: str | None = Field(default=None, description="Signature of a landed transfer to the treasury.")
    transaction: str | None = Field(
        default=None,
        description="Base64 signed transfer to relay to the chain first (LiteSVM demo).",
    )


def bearer_key(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_json(key: ApiKeyInfo) -> dict[str, Any]:
    """One listed key: id and times (Unix seconds), never the secret."""
    return {
        "object": "api_key",
        "id": key.key_id,
        "wallet": key.wallet,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
    }


def receipt_json(receipt: Receipt) -> dict[str, Any]:
    record = asdict(receipt.record)
    return {
        "object": "settlement.receipt",
        **record,
        "settled": receipt.settled,
        "signatures": list(receipt.signatures),
    }


def build_router(handle_getter: Payments) -> APIRouter:
    """Routes for sign-in, API keys, balance, deposits, receipts and payouts over `handle_getter()`."""
    router = APIRouter(tags=["payments"])

    async def caller(credentials: Bearer) -> WalletIdentity:
        return await handle_getter().authenticate(credentials.credentials if credentials else None)

    add_sign_in_routes(router, handle_getter)
    add_key_routes(router, handle_getter, caller)
    add_account_routes(router, handle_getter, caller)
    return router


Caller = Callable[..., Any]  # the dependency that authenticates the request's bearer key


def add_sign_in_routes(router: APIRouter, payments: Payments) -> None:
    """Sign-In-With-Solana: a challenge for a wallet, and an API key for its signature."""

    @router.post("/v1/auth/challenge")
    async def challenge(body: ChallengeBody) -> Any:
        return asdict(await payments().challenge(body.wallet))

    @router.post("/v1/auth/verify")
    async def verify(body: VerifyBody) -> Any:
        key = await payments().verify(SignIn(body.message, body.signature, body.ttl_s))
        return {
            "object": "api_key",
            "id": key.key_id,
            "wallet": key.wallet,
            "api_key": key.secret,
            "created_at": key.created_at,
            "expires_at": key.expires_at,
        }


def add_key_routes(router: APIRouter, payments: Payments, caller: Caller) -> None:
    """The caller's own API keys: list them (never the secrets), revoke one."""
    Who = Annotated[WalletIdentity, Depends(caller)]

    @router.get("/v1/auth/keys")
    async def list_keys(who: Who) -> Any:
        keys = await payments().list_keys(who.wallet)
        return {"object": "list", "data": [key_json(key) for key in keys]}

    @router.delete("/v1/auth/keys/{key_id}")
    async def revoke(key_id: str, who: Who) -> Any:
        await payments().revoke_key(key_id, who.wallet)
        return {"object": "api_key", "id": key_id, "revoked": True}


def add_account_routes(router: APIRouter, payments: Payments, caller: Caller) -> None:
    """The caller's money: balance, deposits (and where to send them), receipts, payouts."""
    Who = Annotated[WalletIdentity, Depends(caller)]

    @router.get("/v1/balance")
    async def balance(who: Who) -> Any:
        return {"object": "balance", **asdict(await payments().balance(who.wallet))}

    @router.post("/v1/deposits", dependencies=[Depends(caller)])
    async def deposit(body: DepositBody) -> Any:
        signature = await deposit_signature(payments(), body)
        return {"object": "deposit", **asdict(await payments().deposit(DepositRequest(signature)))}

    @router.get("/v1/deposits/info")
    async def deposit_info() -> Any:
        return {"object": "deposit.info", **asdict(await payments().deposit_info())}

    @router.get("/v1/receipts/{settlement_id}")
    async def receipt(settlement_id: str, who: Who) -> Any:
        return receipt_json(await payments().get_receipt(ReceiptQuery(settlement_id, who.wallet)))

    @router.get("/v1/payouts")
    async def payouts(who: Who) -> Any:
        lines = await payments().payouts(who.wallet)
        return {"object": "list", "data": [{"object": "payout", **asdict(line)} for line in lines]}


async def deposit_signature(api: PaymentsAPI, body: DepositBody) -> str:
    """The deposit's signature: given, or that of the signed transfer relayed to the chain first."""
    signature = body.signature
    if body.transaction is not None:
        try:
            raw = base64.b64decode(body.transaction, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest("transaction must be base64") from exc
        signature = await api.submit_transaction(raw)
    if signature is None:
        raise InvalidRequest("give a signature or a transaction")
    return signature


__all__ = ["bearer_key", "build_router", "key_json", "receipt_json"]
