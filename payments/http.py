"""HTTP routes of payments, as an APIRouter the gateway mounts:

    from payments.http import build_router
    app.include_router(build_router(lambda: payments_client))

Errors use the OpenAI error format {"error": {"message", "type", "param", "code"}}.
"""

import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from payments.errors import InvalidRequest, PaymentError
from payments.protocol import (
    ApiKeyInfo,
    DepositRequest,
    PaymentsAPI,
    Receipt,
    ReceiptQuery,
    SignIn,
    WalletIdentity,
)


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


def openai_error(exc: PaymentError, param: str | None = None) -> JSONResponse:
    """The OpenAI error JSON for a payments error, with its HTTP status."""
    body = {"error": {"message": exc.message, "type": exc.error_type, "param": param, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status_code)


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


def build_router(handle_getter: Callable[[], PaymentsAPI]) -> APIRouter:
    """Routes for sign-in, API keys, balance, deposits and receipts over `handle_getter()`."""
    router = APIRouter(tags=["payments"])

    async def guarded(call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except PaymentError as exc:
            return openai_error(exc)

    async def caller(authorization: str | None) -> WalletIdentity:
        key = bearer_key(authorization)
        api = handle_getter()
        return await api.authenticate(key)

    @router.post("/v1/auth/challenge")
    async def challenge(body: ChallengeBody) -> Any:
        async def run() -> Any:
            return asdict(await handle_getter().challenge(body.wallet))

        return await guarded(run)

    @router.post("/v1/auth/verify")
    async def verify(body: VerifyBody) -> Any:
        async def run() -> Any:
            key = await handle_getter().verify(SignIn(body.message, body.signature, body.ttl_s))
            return {
                "object": "api_key",
                "id": key.key_id,
                "wallet": key.wallet,
                "api_key": key.secret,
                "created_at": key.created_at,
                "expires_at": key.expires_at,
            }

        return await guarded(run)

    @router.get("/v1/auth/keys")
    async def list_keys(authorization: str | None = Header(default=None)) -> Any:
        async def run() -> Any:
            who = await caller(authorization)
            keys = await handle_getter().list_keys(who.wallet)
            return {"object": "list", "data": [key_json(key) for key in keys]}

        return await guarded(run)

    @router.delete("/v1/auth/keys/{key_id}")
    async def revoke(key_id: str, authorization: str | None = Header(default=None)) -> Any:
        async def run() -> Any:
            who = await caller(authorization)
            await handle_getter().revoke_key(key_id, who.wallet)
            return {"object": "api_key", "id": key_id, "revoked": True}

        return await guarded(run)

    @router.get("/v1/balance")
    async def balance(authorization: str | None = Header(default=None)) -> Any:
        async def run() -> Any:
            who = await caller(authorization)
            return {"object": "balance", **asdict(await handle_getter().balance(who.wallet))}

        return await guarded(run)

    @router.post("/v1/deposits")
    async def deposit(body: DepositBody, authorization: str | None = Header(default=None)) -> Any:
        async def run() -> Any:
            await caller(authorization)
            api = handle_getter()
            signature = body.signature
            if body.transaction is not None:
                try:
                    raw = base64.b64decode(body.transaction, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise InvalidRequest("transaction must be base64") from exc
                signature = await api.submit_transaction(raw)
            if signature is None:
                raise InvalidRequest("give a signature or a transaction")
            return {"object": "deposit", **asdict(await api.deposit(DepositRequest(signature)))}

        return await guarded(run)

    @router.get("/v1/deposits/info")
    async def deposit_info() -> Any:
        async def run() -> Any:
            return {"object": "deposit.info", **asdict(await handle_getter().deposit_info())}

        return await guarded(run)

    @router.get("/v1/receipts/{settlement_id}")
    async def receipt(settlement_id: str, authorization: str | None = Header(default=None)) -> Any:
        async def run() -> Any:
            who = await caller(authorization)
            return receipt_json(await handle_getter().get_receipt(ReceiptQuery(settlement_id, who.wallet)))

        return await guarded(run)

    @router.get("/v1/payouts")
    async def payouts(authorization: str | None = Header(default=None)) -> Any:
        async def run() -> Any:
            who = await caller(authorization)
            lines = await handle_getter().payouts(who.wallet)
            return {"object": "list", "data": [{"object": "payout", **asdict(line)} for line in lines]}

        return await guarded(run)

    return router


__all__ = ["bearer_key", "build_router", "key_json", "openai_error", "receipt_json"]
