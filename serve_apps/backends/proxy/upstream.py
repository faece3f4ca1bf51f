"""Translation between SolanaLM's `GenerateRequest` and upstream HTTP APIs, both ways.

Two flavours: OpenAI-compatible (`/chat/completions`, `/completions`: OpenAI, Ollama, a vLLM server,
another SolanaLM gateway) and Anthropic's Messages API (`/messages`). Each builds the upstream request
from a `GenerateRequest` and turns the upstream's SSE stream into `UpstreamText`/`UpstreamDone` items;
an upstream error (HTTP status or an error event) becomes an `UpstreamError` with the status to answer.
The client gets our own message for that status, never the upstream's text: an upstream's error can name
its account, a part of the proxy's key, its hosts or a traceback. Only the upstream's `code` and `param`
pass, when they are short identifiers; the text is the error's `detail`, which the replica logs.
Pure functions over bytes and dicts: unit-tested with httpx.MockTransport.
"""

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from serve_apps.protocol import GenerateRequest

_ANTHROPIC_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "stop"}
# Anthropic error types -> the HTTP status a client of the proxy gets.
_ANTHROPIC_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 502,
    "permission_error": 502,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 502,
    "overloaded_error": 503,
}


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One HTTP request to send upstream (path relative to the base URL)."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class UpstreamText:
    text: str


@dataclass(frozen=True, slots=True)
class UpstreamDone:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


UpstreamItem = UpstreamText | UpstreamDone


# What the client is told for each status it gets (the upstream's own text stays in the replica's log).
_MESSAGES = {
    400: "the upstream provider refused the request",
    404: "the upstream provider does not serve this model",
    413: "the request is too large for the upstream provider",
    429: "the upstream provider's rate limit is reached; retry later",
    502: "the upstream provider failed",
    503: "the upstream provider is overloaded; retry later",
}
_DEFAULT_CODES = {400: "upstream_rejected", 404: "model_not_found", 413: "upstream_rejected"}
_DEFAULT_CODES |= {429: "rate_limit_exceeded", 502: "upstream_error", 503: "upstream_unavailable"}
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.\[\]]{0,63}")  # an OpenAI-style code or param: no free text
DETAIL_CHARS = 500  # of the upstream's text kept for the log


class UpstreamError(Exception):
    """The upstream refused or failed: answer the client with this status (OpenAI error format), our own
    message for it, and log `detail` (what the upstream said)."""

    def __init__(
        self,
        status: int,
        detail: str = "",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.status = status if status in _MESSAGES else 502
        self.message = _MESSAGES[self.status]
        super().__init__(self.message)
        self.detail = detail[:DETAIL_CHARS]
        self.param = _identifier(param) if self.status == 400 else None
        self.code = _identifier(code) if self.status in (400, 404, 413) else None
        self.code = self.code or _DEFAULT_CODES[self.status]
        self.retry_after_s = retry_after_s


def _identifier(value: object) -> str | None:
    return value if isinstance(value, str) and _IDENTIFIER.fullmatch(value) else None


class UpstreamAPI(Protocol):
    """One upstream flavour."""

    def call(self, request: GenerateRequest, model: str, max_tokens: int, api_key: str | None) -> UpstreamCall: ...

    def items(self, lines: AsyncIterator[str]) -> AsyncIterator[UpstreamItem]: ...

    def error(self, status: int, body: bytes, retry_after: str | None) -> UpstreamError: ...


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) of each server-sent event; multi-line data joined by newlines."""
    event: str | None = None
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield event, "\n".join(data)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _json(body: bytes) -> dict[str, Any]:
    try:
        loaded = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


class OpenAIUpstream:
    """OpenAI-compatible upstreams: chat and text completions, streamed with usage in the last chunk."""

    def call(self, request: GenerateRequest, model: str, max_tokens: int, api_key: str | None) -> UpstreamCall:
        sampling = request.sampling
        body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
        if request.messages is not None:
            path = "/chat/completions"
            body["messages"] = [{"role": turn.role, "content": turn.content} for turn in request.messages]
        else:
            path = "/completions"
            body["prompt"] = request.prompt
        body["max_tokens"] = max_tokens
        body["temperature"] = sampling.temperature
        body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.top_k > 0:  # not OpenAI's: sent only when the client asked for it
            body["top_k"] = sampling.top_k
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return UpstreamCall(path, body, headers)

    async def items(self, lines: AsyncIterator[str]) -> AsyncIterator[UpstreamItem]:
        finish: str | None = None
        usage: dict[str, Any] = {}
        async for _, data in sse_events(lines):
            if data == "[DONE]":
                break
            chunk = _json(data.encode())
            if "error" in chunk:
                error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                raise UpstreamError(502, f"error event: {error.get('message', 'unknown')}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                text = delta.get("content") if "delta" in choice else choice.get("text")
                if text:
                    yield UpstreamText(text)
                finish = choice.get("finish_reason") or finish
        if finish is None:
            raise UpstreamError(502, "the upstream stream ended without a finish reason")
        yield UpstreamDone(
            "length" if finish == "length" else "stop", usage.get("prompt_tokens"), usage.get("completion_tokens")
        )

    def error(self, status: int, body: bytes, retry_after: str | None) -> UpstreamError:
        error = _json(body).get("error")
        if not isinstance(error, dict):
            error = {}
        return UpstreamError(
            _client_status(status),
            f"HTTP {status}: {body.decode(errors='replace')}",
            error.get("param"),
            error.get("code") or error.get("type"),
            _retry_after(retry_after),
        )


class AnthropicUpstream:
    """Anthropic's Messages API: system turns become `system`, SSE content deltas become text."""

    def __init__(self, version: str = "2023-06-01") -> None:
        self.version = version

    def call(self, request: GenerateRequest, model: str, max_tokens: int, api_key: str | None) -> UpstreamCall:
        sampling = request.sampling
        turns = request.messages if request.messages is not None else ()
        system = "\n\n".join(turn.content for turn in turns if turn.role == "system")
        messages = [{"role": turn.role, "content": turn.content} for turn in turns if turn.role != "system"]
        if request.prompt is not None:
            messages = [{"role": "user", "content": request.prompt}]
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
            # Anthropic's range is 0..1; OpenAI's 0..2 is clamped (0 stays greedy).
            "temperature": min(sampling.temperature, 1.0),
        }
        if system:
            body["system"] = system
        if sampling.top_p < 1.0:
            body["top_p"] = sampling.top_p
        if sampling.top_k > 0:
            body["top_k"] = sampling.top_k
        if sampling.stop:
            body["stop_sequences"] = list(sampling.stop)
        headers = {"anthropic-version": self.version}
        if api_key:
            headers["x-api-key"] = api_key
        return UpstreamCall("/messages", body, headers)

    async def items(self, lines: AsyncIterator[str]) -> AsyncIterator[UpstreamItem]:
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        finish: str | None = None
        async for event, data in sse_events(lines):
            payload = _json(data.encode())
            kind = payload.get("type", event)
            if kind == "error":
                raise self._error_of(payload, None)
            if kind == "message_start":
                usage = (payload.get("message") or {}).get("usage") or {}
                prompt_tokens = usage.get("input_tokens", prompt_tokens)
            elif kind == "content_block_delta":
                delta = payload.get("delta") or {}
                if delta.get("type") == "text_delta" and delta.get("text"):
                    yield UpstreamText(delta["text"])
            elif kind == "message_delta":
                reason = (payload.get("delta") or {}).get("stop_reason")
                finish = _ANTHROPIC_STOP.get(reason, "stop") if reason else finish
                completion_tokens = (payload.get("usage") or {}).get("output_tokens", completion_tokens)
            elif kind == "message_stop":
                break
        if finish is None:
            raise UpstreamError(502, "the upstream stream ended without a stop reason")
        yield UpstreamDone(finish, prompt_tokens, completion_tokens)

    def error(self, status: int, body: bytes, retry_after: str | None) -> UpstreamError:
        error = self._error_of(_json(body), _client_status(status), f"HTTP {status}: {body.decode(errors='replace')}")
        error.retry_after_s = _retry_after(retry_after)
        return error

    @staticmethod
    def _error_of(payload: dict[str, Any], status: int | None, detail: str | None = None) -> UpstreamError:
        """An Anthropic error body; a mid-stream error event (no HTTP status) gets its type's status."""
        raw = payload.get("error")
        error: dict[str, Any] = raw if isinstance(raw, dict) else {}
        kind = str(error.get("type") or "api_error")
        if status is None:
            status = _client_status(_ANTHROPIC_STATUS.get(kind, 502))
        return UpstreamError(status, detail or f"{kind}: {error.get('message')}", code=kind)


def _client_status(status: int) -> int:
    """The status the proxy's client gets, by class: the client's own faults (400/422, 404, 413) and the
    upstream's rate limit (429) keep theirs, an overloaded upstream (503, Anthropic's 529) is a 503, and
    everything else, the proxy's own credentials refused upstream (401/403) included, is a 502."""
    if status == 422:
        return 400
    if status in (503, 529):
        return 503
    return status if status in (400, 404, 413, 429) else 502
