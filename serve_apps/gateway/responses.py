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


@dataclass(slots=True)
class ChoiceOut:
    """One choice of a whole answer: its text, why it ended, its tool calls and logprobs (OpenAI's shape)."""

    text: str | None
    finish_reason: str
    tool_calls: list[dict] | None = None
    logprobs: dict | None = None


def full_response(
    meta: ResponseMeta,
    text: str | None,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    tool_calls: list[dict] | None = None,
) -> dict:
    """The whole answer of one choice (see `full_response_choices`)."""
    return full_response_choices(meta, [ChoiceOut(text, finish_reason, tool_calls)], prompt_tokens, completion_tokens)


def full_response_choices(
    meta: ResponseMeta, choices: list[ChoiceOut], prompt_tokens: int, completion_tokens: int
) -> dict:
    """The whole answer; a choice with `tool_calls` (OpenAI's shape) carries them in its message, its
    finish_reason is "tool_calls" and content is the text beside them (null when there is none).
    `completion_tokens` counts every choice's tokens, the prompt is counted once."""
    out = []
    for index, choice in enumerate(choices):
        finish_reason = choice.finish_reason
        if meta.chat:
            message: dict = {"role": "assistant", "content": choice.text}
            if choice.tool_calls:
                message["tool_calls"] = choice.tool_calls
                finish_reason = "tool_calls"
            body = {"index": index, "message": message, "logprobs": choice.logprobs, "finish_reason": finish_reason}
        else:
            body = {"index": index, "text": choice.text, "logprobs": choice.logprobs, "finish_reason": finish_reason}
        out.append(body)
    return {
        "id": meta.request_id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "choices": out,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    meta: ResponseMeta,
    text: str | None,
    finish_reason: str | None,
    first: bool = False,
    index: int = 0,
    logprobs: dict | None = None,
) -> dict:
    if meta.chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": meta.request_id, "object": obj, "created": meta.created, "model": meta.model, "choices": [choice]}


def tool_call_chunks(meta: ResponseMeta, calls: list[dict], choice: int = 0) -> list[dict]:
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
            chunks.append(_delta_chunk(meta, {"tool_calls": [part]}, choice=choice))
    return chunks


def _delta_chunk(meta: ResponseMeta, delta: dict, finish_reason: str | None = None, choice: int = 0) -> dict:
    body = {"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": meta.request_id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [body],
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
