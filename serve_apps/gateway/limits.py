"""Request limits: oversized bodies rejected before parsing, and rate limits (both ASGI middleware).

Rate limits use the `limits` library (sliding window counters in its MemoryStorage): O(1) memory per
bucket, and a bucket is forgotten only when its window has passed, never because other clients made
new ones, so no flood of addresses, keys or wallets can reset someone else's bucket.
"""

import json
import math
import time
from collections.abc import Callable
from ipaddress import IPv6Address, ip_address, ip_network

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.config.rate_limits import RateLimit, RateLimitsSection
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
    await send_error(send, 413, f"request body exceeds {max_bytes} bytes", "body_too_large")


async def send_error(send: Send, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
    """An OpenAI-format error answered straight from ASGI middleware (before any route runs)."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


# Route classes with a bucket of their own per address, besides `per_address` (path prefixes).
ROUTE_CLASSES: tuple[tuple[str, str], ...] = (
    ("/v1/auth/", "auth"),
    ("/v1/providers/challenge", "auth"),
    ("/v1/providers/register", "auth"),
    ("/v1/deposits", "deposits"),
    ("/healthz", "health"),
)


def route_class(path: str) -> str | None:
    """The route class of a request path (None: only the address's bucket applies)."""
    return next((name for prefix, name in ROUTE_CLASSES if path.startswith(prefix)), None)


class RequestLimiter:
    """The gateway's buckets: per client address before authentication, per wallet after it."""

    def __init__(self, section: RateLimitsSection) -> None:
        self.section = section
        self._strategy = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._items = {
            name: _item(getattr(section, name), name)
            for name in ("per_address", "per_wallet", "auth", "deposits", "health")
        }
        self._trusted = [ip_network(entry, strict=False) for entry in section.trusted_proxies]

    def check_address(self, address: str, path: str) -> float:
        """0 when a request from `address` to `path` may go; else the seconds until it may."""
        wait_s = self._hit("per_address", address)
        kind = route_class(path)
        if wait_s == 0 and kind is not None:
            wait_s = self._hit(kind, address)
        return wait_s

    def check_wallet(self, wallet: str) -> float:
        """0 when a signed-in wallet may make another completion request; else the seconds until it may."""
        return self._hit("per_wallet", wallet)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The bucket key of the client: its address (IPv6 by /64), through trusted proxies only."""
        address = peer or "unknown"
        if forwarded_for and self._is_trusted(address):
            hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
            # The nearest hop not set by one of our proxies is the client (earlier hops are the client's word).
            while hops and self._is_trusted(address):
                address = hops.pop()
        return _bucket_key(address)

    def _is_trusted(self, address: str) -> bool:
        try:
            parsed = ip_address(address)
        except ValueError:
            return False
        return any(parsed in network for network in self._trusted)

    def _hit(self, name: str, key: str) -> float:
        item = self._items[name]
        if item is None or self._strategy.hit(item, key):
            return 0.0
        reset_at = self._strategy.get_window_stats(item, key).reset_time
        return max(reset_at - time.time(), 1.0 / item.amount)


def _item(limit: RateLimit, name: str) -> RateLimitItem | None:
    return RateLimitItemPerSecond(limit.requests, limit.window_s, namespace=name) if limit.requests else None


def _bucket_key(address: str) -> str:
    try:
        parsed = ip_address(address)
    except ValueError:
        return address[:64]  # not an address (a test client's name): its own bucket
    if isinstance(parsed, IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ip_network(f"{parsed}/64", strict=False))  # one holder gets a /64, not one address
    return str(parsed)


class RateLimitMiddleware:
    """429 (OpenAI error, Retry-After) when the client address's bucket, or its route class's, is empty."""

    def __init__(self, app: ASGIApp, limiter_of: Callable[[Scope], RequestLimiter | None]) -> None:
        self.app = app
        self.limiter_of = limiter_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limiter = self.limiter_of(scope) if scope["type"] == "http" else None
        if limiter is None:
            await self.app(scope, receive, send)
            return
        forwarded = b",".join(v for k, v in scope.get("headers") or [] if k == b"x-forwarded-for")
        client = scope.get("client")
        address = limiter.client_address(client[0] if client else None, forwarded.decode("latin-1") or None)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        wait_s = limiter.check_address(address, path)
        if wait_s > 0:
            await send_error(
                send,
                429,
                "rate limit reached for this client; retry later",
                "rate_limit_exceeded",
                retry_after_header(wait_s),
            )
            return
        await self.app(scope, receive, send)


def retry_after_header(wait_s: float) -> dict[str, str]:
    """The Retry-After header of a 429: whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
