"""A hand-written gateway behind httpx.MockTransport for the SDK's unit tests: the routes' JSON shapes as
payments/http.py and serve_apps/gateway/app.py answer them, with scripted failures."""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from solders.pubkey import Pubkey
from solders.signature import Signature

SETTLEMENT = "set_0123456789abcdef"
KEY = "slm_secret"


def error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "settlement_id": SETTLEMENT,
    }


def sse(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def chunk(text: str | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "tiny",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


@dataclass
class FakeGateway:
    """Routes by (method, path); `fail` scripts responses served before the real one, per route."""

    wallet: str | None = None
    fail: dict[str, list[httpx.Response]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    challenges: dict[str, str] = field(default_factory=dict)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        route = f"{request.method} {request.url.path}"
        self.calls.append(route)
        if self.fail.get(route):
            return self.fail[route].pop(0)
        handler = self.routes().get(route)
        if handler is None:
            return error(404, f"no route {route}", "not_found")
        public = route in ("POST /v1/auth/challenge", "POST /v1/auth/verify", "GET /v1/models")
        if not public and request.headers.get("authorization") != f"Bearer {KEY}":
            return error(401, "invalid or revoked API key", "invalid_api_key")
        return handler(request)

    def routes(self) -> dict[str, Callable[[httpx.Request], httpx.Response]]:
        return {
            "POST /v1/auth/challenge": self.challenge,
            "POST /v1/auth/verify": self.verify,
            "GET /v1/models": lambda r: httpx.Response(200, json={"object": "list", "data": [{"id": "tiny"}]}),
            "GET /v1/balance": lambda r: httpx.Response(
                200,
                json={
                    "object": "balance",
                    "wallet": self.wallet,
                    "available": 900,
                    "held": 0,
                    "unpaid_earnings": 40,
                    "asset": "SOL",
                },
            ),
            "GET /v1/auth/keys": lambda r: httpx.Response(
                200,
                json={
                    "object": "list",
                    "data": [
                        {"id": "key_a", "wallet": self.wallet, "created_at": 1.0, "expires_at": 9.0, "revoked_at": None}
                    ],
                },
            ),
            "GET /v1/payouts": lambda r: httpx.Response(
                200,
                json={
                    "object": "list",
                    "data": [
                        {
                            "object": "payout",
                            "batch_id": "b1",
                            "wallet": self.wallet,
                            "amount": 70,
                            "state": "confirmed",
                            "signature": "sig1",
                            "created_at": 1.0,
                            "updated_at": 2.0,
                        },
                        {
                            "object": "payout",
                            "batch_id": "b2",
                            "wallet": self.wallet,
                            "amount": 5,
                            "state": "sent",
                            "signature": "sig2",
                            "created_at": 3.0,
                            "updated_at": 3.0,
                        },
                    ],
                },
            ),
            "POST /v1/chat/completions": self.chat,
        }

    def challenge(self, request: httpx.Request) -> httpx.Response:
        wallet = json.loads(request.content)["wallet"]
        message = f"solanalm.test wants you to sign in with your Solana account:\n{wallet}\n\nNonce: abc"
        self.challenges[message] = wallet
        return httpx.Response(200, json={"message": message, "nonce": "abc", "expires_at": 1e10})

    def verify(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        wallet = self.challenges.pop(body["message"], None)
        if wallet is None:
            return error(401, "unknown, expired or already used nonce", "invalid_nonce")
        if not Signature.from_string(body["signature"]).verify(Pubkey.from_string(wallet), body["message"].encode()):
            return error(401, "signature does not match the wallet", "invalid_signature")
        self.wallet = wallet
        return httpx.Response(200, json={"object": "api_key", "id": "key_a", "wallet": wallet, "api_key": KEY})

    def chat(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("stream"):
            chunks = [
                chunk("Hel"),
                chunk("lo"),
                chunk(None, "length", settlement_id=SETTLEMENT),
                {
                    **chunk(None),
                    "choices": [],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                },
            ]
            return httpx.Response(
                200, content=sse(chunks), headers={"content-type": "text/event-stream", "x-request-id": "req-s"}
            )
        headers = {"x-solanalm-settlement-id": SETTLEMENT, "x-request-id": "req-1"}
        return httpx.Response(200, json=completion("Hello"), headers=headers)
