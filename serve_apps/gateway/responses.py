"""OpenAI response bodies (chat.completion, text_completion and their stream chunks)."""

import json
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """Identifies one response: its id, kind (chat or text), model and creation time."""

    request_id: str
    model: str
    chat: bool
    created: int

    @classmethod
    def new(cls, request_id: str, model: str, chat: bool) -> "ResponseMeta":
        return cls(request_id, model, chat, int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def full_response(
    meta: ResponseMeta,
    text: str | None,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    tool_calls: list[dict] | None = None,
) -> dict:
    """The whole answer; with `tool_calls` (OpenAI's shape) the message carries them, finish_reason is
    "tool_calls" and content is the text beside them (null when there is none)."""
    if meta.chat:
        message: dict = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
            finish_reason = "tool_calls"
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": meta.request_id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(meta: ResponseMeta, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
    if meta.chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": meta.request_id, "object": obj, "created": meta.created, "model": meta.model, "choices": [choice]}


def tool_call_chunks(meta: ResponseMeta, calls: list[dict]) -> list[dict]:
    """OpenAI's streamed tool calls: per call, a delta with its index, id, type and name (arguments ""),
    then one with its arguments."""
    chunks = []
    for index, call in enumerate(calls):
        head = {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        arguments = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
        for part in (head, arguments):
            chunks.append(_delta_chunk(meta, {"tool_calls": [part]}))
    return chunks


def _delta_chunk(meta: ResponseMeta, delta: dict, finish_reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": meta.request_id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
    }


def usage_chunk(meta: ResponseMeta, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if meta.chat else "text_completion"
    return {
        "id": meta.request_id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
