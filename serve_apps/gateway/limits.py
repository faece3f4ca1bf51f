"""Request limits: oversized bodies rejected before parsing (ASGI middleware), per-client rate limits."""

import math
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_apps.gateway.current import current_max_body_bytes
from serve_apps.gateway.errors import error_body


class BodySizeLimit:
    """413 in OpenAI error format when Content-Length (or the bytes actually received) exceed max_bytes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = current_max_body_bytes() or self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await _reject(send, max_bytes)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _reject(send, max_bytes)


class _TooLarge(Exception):
    pass


async def _reject(send: Send, max_bytes: int) -> None:
    import json

    body = json.dumps(error_body(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass
class ClientRateLimiter:
    """A token bucket per client (API key, else address): `rate_per_s` sustained, `burst` at once."""

    rate_per_s: float
    burst: int
    max_clients: int = 100_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # client -> (tokens, last time)

    def acquire(self, client: str, now: float | None = None) -> float:
        """0 when the request may go; else the seconds until it may (the caller answers 429)."""
        if self.rate_per_s <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s
        if len(self._buckets) >= self.max_clients and client not in self._buckets:
            self._buckets.clear()  # bounded memory: forgetting buckets only ever lets requests through
        self._buckets[client] = (tokens - 1.0, now)
        return 0.0


def retry_after_header(wait_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
