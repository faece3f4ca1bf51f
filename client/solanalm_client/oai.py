"""The border with the `openai` client: its exceptions become the SDK's own (`... from exc`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import openai

from solanalm_client.errors import ConnectionFailed, SolanaLMError, error_from_response


def translate(exc: openai.OpenAIError) -> SolanaLMError:
    if isinstance(exc, openai.APIStatusError):
        return error_from_response(exc.response)  # type: ignore[arg-type]  # httpx2's Response, same API
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return ConnectionFailed(f"cannot reach the gateway: {exc}", code="connection_failed")
    if isinstance(exc, openai.APIError):  # an error event inside a stream
        return SolanaLMError(exc.message, code=getattr(exc, "code", None), param=getattr(exc, "param", None))
    return SolanaLMError(str(exc))


@contextmanager
def openai_errors() -> Iterator[None]:
    try:
        yield
    except openai.OpenAIError as exc:
        raise translate(exc) from exc
