"""The SDK's calls as data: each method of the sync and the async client builds one `Call` here, and the
two transports only send it (so the two clients cannot drift apart), retrying under `RetryPolicy`.

Retries (tenacity): an idempotent call (GET, DELETE) is retried on 429, 503 and connection failures; a
call that spends or creates something (inference, sign-in, a deposit) only on a 429, which the gateway's
rate limiter answers before doing any work. The wait is the server's Retry-After when it sends one, else
exponential backoff with jitter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from solanalm_client import models as M
from solanalm_client.errors import ConnectionFailed, RateLimited, ServiceUnavailable, SolanaLMError

T = TypeVar("T")
SETTLEMENT_HEADER = "x-solanalm-settlement-id"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry (see the module docstring for which calls and errors)."""

    attempts: int = 4  # tries in all, the first included; 1 disables retrying
    initial_wait_s: float = 0.5  # backoff scale when no Retry-After is sent
    max_wait_s: float = 30.0  # cap of one wait, Retry-After included

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_wait_s < 0 or self.max_wait_s < 0:
            raise ValueError("RetryPolicy: attempts >= 1 and non-negative waits")

    def tenacity_kwargs(self, idempotent: bool) -> dict[str, Any]:
        backoff = wait_random_exponential(multiplier=self.initial_wait_s, max=self.max_wait_s)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            after = getattr(exc, "retry_after_s", None)
            return min(float(after), self.max_wait_s) if after is not None else float(backoff(state))

        return {
            "stop": stop_after_attempt(self.attempts),
            "wait": wait,
            "retry": retry_if_exception(lambda exc: retryable(exc, idempotent)),
            "reraise": True,
        }


def retryable(exc: BaseException, idempotent: bool) -> bool:
    if isinstance(exc, RateLimited):
        return True
    return idempotent and isinstance(exc, ServiceUnavailable | ConnectionFailed)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One HTTP call of the SolanaLM API and how its JSON becomes a typed result."""

    method: str
    path: str  # below the API root, e.g. /v1/balance
    parse: Callable[[Any], T]
    json: dict[str, Any] | None = None
    auth: bool = True
    idempotent: bool = True
    params: dict[str, Any] = field(default_factory=dict)


def _data(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise SolanaLMError(f"unexpected response, not a list: {str(body)[:200]}", code="bad_response")
    return body["data"]


def challenge(wallet: str) -> Call[str]:
    return Call("POST", "/v1/auth/challenge", lambda b: str(b["message"]), {"wallet": wallet}, auth=False)


def verify(message: str, signature: str, ttl_s: int | None = None) -> Call[M.ApiKey]:
    body: dict[str, Any] = {"message": message, "signature": signature}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return Call("POST", "/v1/auth/verify", M.ApiKey.from_json, body, auth=False, idempotent=False)


def list_keys() -> Call[list[M.KeyInfo]]:
    return Call("GET", "/v1/auth/keys", lambda b: [M.KeyInfo.from_json(k) for k in _data(b)])


def revoke_key(key_id: str) -> Call[bool]:
    return Call("DELETE", f"/v1/auth/keys/{_segment(key_id, 'key_id')}", lambda b: bool(b.get("revoked", True)))


def balance() -> Call[M.Balance]:
    return Call("GET", "/v1/balance", M.Balance.from_json)


def receipt(settlement_id: str) -> Call[M.Receipt]:
    return Call("GET", f"/v1/receipts/{_segment(settlement_id, 'settlement_id')}", M.Receipt.from_json)


def deposit_info() -> Call[M.DepositInfo]:
    return Call("GET", "/v1/deposits/info", M.DepositInfo.from_json, auth=False)


def credit_deposit(*, transaction_b64: str | None = None, signature: str | None = None) -> Call[M.Deposit]:
    # Crediting a signature twice credits it once, but a relayed transaction is sent again: not idempotent.
    body = {"transaction": transaction_b64} if transaction_b64 is not None else {"signature": signature}
    return Call("POST", "/v1/deposits", M.Deposit.from_json, body, idempotent=transaction_b64 is None)


def payouts() -> Call[list[M.Payout]]:
    return Call("GET", "/v1/payouts", lambda b: [M.Payout.from_json(p) for p in _data(b)])


def network_nodes() -> Call[list[M.ProviderNode]]:
    return Call("GET", "/v1/network/nodes", lambda b: [M.ProviderNode.from_json(n) for n in _data(b)], auth=False)


def models() -> Call[list[str]]:
    return Call("GET", "/v1/models", lambda b: [str(m["id"]) for m in _data(b)], auth=False)


def earnings(wallet: str, balance: M.Balance, lines: list[M.Payout]) -> M.Earnings:
    """Unpaid (the ledger's balance), in flight (open batches) and paid (confirmed batches)."""
    paid = sum(p.amount for p in lines if p.state == "confirmed")
    in_flight = sum(p.amount for p in lines if p.state in ("created", "signed", "sent"))
    return M.Earnings(wallet, balance.unpaid_earnings, in_flight, paid, tuple(lines))


def provider_status(wallet: str, nodes: list[M.ProviderNode]) -> M.ProviderStatus:
    return M.ProviderStatus(wallet, tuple(n for n in nodes if n.wallet == wallet))


def _segment(value: str, name: str) -> str:
    if not value or "/" in value or len(value) > 128:
        raise SolanaLMError(f"{name} must be a non-empty id without '/'", code="invalid_value", param=name)
    return value


def api_root(url: str) -> str:
    """http://host:port from what a user gives (with or without the /v1 suffix)."""
    root = url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise SolanaLMError(f"the gateway URL must start with http:// or https://, got {url!r}", param="url")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def parse_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise SolanaLMError(
            f"the gateway answered {response.status_code} with non-JSON: {response.text[:200]}",
            status=response.status_code,
            code="bad_response",
        ) from None


def chat_messages(prompt: str | None, messages: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if (prompt is None) == (messages is None):
        raise SolanaLMError("give exactly one of prompt or messages", code="invalid_value", param="prompt")
    if messages is not None:
        if not messages:
            raise SolanaLMError("messages must not be empty", code="invalid_value", param="messages")
        return messages
    return [{"role": "user", "content": prompt}]


def extra_of(obj: Any, name: str) -> Any:
    """A field the gateway adds beyond OpenAI's schema (e.g. settlement_id), from an openai model."""
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get(name)


def result_of(completion: Any, headers: Mapping[str, str]) -> M.InferenceResult:
    choice = completion.choices[0]
    text = choice.message.content if hasattr(choice, "message") else choice.text
    usage = completion.usage
    return M.InferenceResult(
        text or "",
        headers.get(SETTLEMENT_HEADER) or extra_of(completion, "settlement_id"),
        headers.get("x-request-id"),
        completion.model,
        choice.finish_reason,
        M.Usage(usage.prompt_tokens, usage.completion_tokens) if usage else None,
        completion,
    )


class StreamState:
    """Collects a stream's deltas; the final chunk carries the settlement id (headers are gone by then)."""

    def __init__(self, model: str, request_id: str | None) -> None:
        self.model, self.request_id = model, request_id
        self.parts: list[str] = []
        self.settlement_id: str | None = None
        self.finish_reason: str | None = None
        self.usage: M.Usage | None = None

    def take(self, chunk: Any) -> str:
        """The chunk's text delta ('' for none), remembering settlement id, finish reason and usage."""
        self.settlement_id = extra_of(chunk, "settlement_id") or self.settlement_id
        if chunk.usage is not None:
            self.usage = M.Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        if not chunk.choices:
            return ""
        choice = chunk.choices[0]
        self.finish_reason = choice.finish_reason or self.finish_reason
        text = (choice.delta.content if hasattr(choice, "delta") else choice.text) or ""
        self.parts.append(text)
        return text

    def result(self) -> M.InferenceResult:
        return M.InferenceResult(
            "".join(self.parts), self.settlement_id, self.request_id, self.model, self.finish_reason, self.usage
        )
