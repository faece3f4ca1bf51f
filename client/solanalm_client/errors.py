"""OpenAI-style errors as exceptions: every HTTP error of the gateway becomes a `SolanaLMError`.

The gateway answers errors as {"error": {"message", "type", "param", "code"}}; `error_from_response`
turns one into the subclass of its status (401, 402, 403, 404, 429), so callers catch what they handle.
"""

from __future__ import annotations

from typing import Any

import httpx


class SolanaLMError(Exception):
    """An error of the SolanaLM API or of the client's own input (status None: nothing was sent)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.error_type = error_type
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        code = f" ({self.code})" if self.code else ""
        return f"{where}{self.message}{code}"


class AuthenticationError(SolanaLMError):
    """401: no, a bad, an expired or a revoked API key, or a refused sign-in."""


class InsufficientBalance(SolanaLMError):
    """402: the wallet's balance does not cover the request; deposit first."""


class PermissionDenied(SolanaLMError):
    """403: e.g. a receipt of another wallet, or another wallet's API key."""


class NotFound(SolanaLMError):
    """404: no such receipt, key or route."""


class RateLimited(SolanaLMError):
    """429: retry after `retry_after_s`."""


class ServiceUnavailable(SolanaLMError):
    """503: payments or the pipeline are starting or unavailable."""


class KeypairError(SolanaLMError):
    """The keypair file is missing, unreadable or not a Solana CLI keypair (JSON array of 64 bytes)."""


class ConnectionFailed(SolanaLMError):
    """The gateway (or the RPC node) could not be reached."""


_BY_STATUS: dict[int, type[SolanaLMError]] = {
    401: AuthenticationError,
    402: InsufficientBalance,
    403: PermissionDenied,
    404: NotFound,
    429: RateLimited,
    503: ServiceUnavailable,
}


def retry_after_of(headers: httpx.Headers | dict[str, str] | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form the gateway sends); None when absent or a date."""
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_from_body(status: int, body: Any, headers: httpx.Headers | dict[str, str] | None = None) -> SolanaLMError:
    """The exception for an error status and its (OpenAI-format, or not) JSON body."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):  # FastAPI validation errors ({"detail": [...]}) and plain text
        detail = {"message": _plain_message(body) or f"HTTP {status}", "code": None}
    cls = _BY_STATUS.get(status, SolanaLMError)
    return cls(
        str(detail.get("message") or f"HTTP {status}"),
        status=status,
        code=detail.get("code"),
        param=detail.get("param"),
        error_type=detail.get("type"),
        retry_after_s=retry_after_of(headers),
    )


def error_from_response(response: httpx.Response) -> SolanaLMError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_body(response.status_code, body, response.headers)


def _plain_message(body: Any) -> str:
    if isinstance(body, dict) and "detail" in body:
        return f"invalid request: {body['detail']}"
    return str(body)[:500] if body else ""


__all__ = [
    "AuthenticationError",
    "ConnectionFailed",
    "InsufficientBalance",
    "KeypairError",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ServiceUnavailable",
    "SolanaLMError",
    "error_from_body",
    "error_from_response",
    "retry_after_of",
]
