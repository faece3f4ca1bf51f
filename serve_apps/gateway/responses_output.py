"""Responses API output: a chat answer as a Response object, and a chat stream's chunks as OpenAI's events.

`from_chat_completion` turns a whole chat.completion body into a `response` object; `ResponseEvents`
reads the chunks `Gateway.chunk_events` yields (text deltas, tool_calls deltas, the finish chunk, the
usage chunk, "[DONE]", or an error body) and answers OpenAI's streamed events in their order:
response.created, response.in_progress, then per output item output_item.added, (content_part.added,
output_text.delta..., output_text.done, content_part.done | function_call_arguments.delta,
function_call_arguments.done), output_item.done, and last response.completed or response.incomplete
(a max_output_tokens stop), or error and response.failed. Every event has `type` and `sequence_number`.
"""

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_apps.gateway.responses_api import ResponsesRequest


def echo_fields(body: "ResponsesRequest") -> dict[str, Any]:
    """The request's settings as a Response object repeats them (the openai SDK's Response model needs them)."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    choice = body.tool_choice or "auto"
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "model": body.model,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "user": body.user,
    }


def response_object(
    response_id: str,
    created_at: int,
    echo: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "output": output,
        "usage": usage,
        **echo,
    }


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat usage as Responses usage (no cached or reasoning tokens here)."""
    if chat_usage is None:
        return None
    prompt, completion = chat_usage["prompt_tokens"], chat_usage["completion_tokens"]
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def from_chat_completion(response_id: str, echo: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """A whole chat.completion body (one choice) as a Response object; its settlement_id stays beside."""
    choice = answer["choices"][0]
    message = choice["message"]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    calls = message.get("tool_calls") or []
    output = []
    if message.get("content") or not calls:
        output.append(message_item(new_item_id("msg"), message.get("content") or "", status))
    for call in calls:
        function = call["function"]
        output.append(call_item(new_item_id("fc"), call["id"], function["name"], function["arguments"]))
    result = response_object(response_id, answer["created"], echo, status, output, usage_of(answer["usage"]))
    if "settlement_id" in answer:
        result["settlement_id"] = answer["settlement_id"]
    return result


def sse_event(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


class ResponseEvents:
    """One streamed response: feed it the chat chunks, send the events it answers (a pure state machine)."""

    def __init__(self, response_id: str, echo: dict[str, Any], created_at: int | None = None) -> None:
        self.response_id, self.echo = response_id, echo
        self.created_at = int(time.time()) if created_at is None else created_at
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # items done
        self.text: dict[str, Any] | None = None  # the message item being written
        self.call: dict[str, Any] | None = None  # the function_call item being written
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.settlement_id: str | None = None
        self.ended = False

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _response(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        done = status not in ("in_progress",)
        usage = usage_of(self.usage) if done else None
        result = response_object(self.response_id, self.created_at, self.echo, status, list(self.output), usage, error)
        if self.settlement_id is not None:
            result["settlement_id"] = self.settlement_id
        return result

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._response("in_progress")),
            self._event("response.in_progress", response=self._response("in_progress")),
        ]

    def feed(self, chunk: dict[str, Any] | str) -> list[dict[str, Any]]:
        """The events `chunk` (one of Gateway.chunk_events') makes; none once the response has ended."""
        if self.ended:
            return []
        if chunk == "[DONE]":
            return self._finish()
        if not isinstance(chunk, dict):  # chunk_events yields dicts and "[DONE]" only
            return []
        if "error" in chunk:
            return self._fail(chunk["error"])
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if "settlement_id" in chunk:
            self.settlement_id = chunk["settlement_id"]
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def _text_delta(self, text: str) -> list[dict[str, Any]]:
        events = self._close_call()
        item = self.text
        if item is None:
            item = self.text = {"id": new_item_id("msg"), "text": ""}
            events += self._opened(item)
        item["text"] += text
        events.append(self._event("response.output_text.delta", **self._where(item), delta=text, logprobs=[]))
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        function = call.get("function") or {}
        if call.get("id"):  # a call's head: a new item
            events += self._close_text() + self._close_call()
            self.call = {"id": new_item_id("fc"), "call_id": call["id"], "name": function["name"], "arguments": ""}
            item = call_item(self.call["id"], call["id"], function["name"], "", "in_progress")
            events.append(self._event("response.output_item.added", output_index=len(self.output), item=item))
        arguments = function.get("arguments") or ""
        if arguments and self.call is not None:
            self.call["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.call["id"],
                    output_index=len(self.output),
                    delta=arguments,
                )
            )
        return events

    def _where(self, text: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": text["id"], "output_index": len(self.output), "content_index": 0}

    def _close_text(self) -> list[dict[str, Any]]:
        if self.text is None:
            return []
        text, where = self.text["text"], self._where(self.text)
        status = "incomplete" if self.finish_reason == "length" else "completed"
        item = message_item(self.text["id"], text, status)
        events = [
            self._event("response.output_text.done", **where, text=text, logprobs=[]),
            self._event("response.content_part.done", **where, part=_part(text)),
            self._event("response.output_item.done", output_index=where["output_index"], item=item),
        ]
        self.output.append(item)
        self.text = None
        return events

    def _close_call(self) -> list[dict[str, Any]]:
        if self.call is None:
            return []
        call, index = self.call, len(self.output)
        item = call_item(call["id"], call["call_id"], call["name"], call["arguments"])
        events = [
            self._event(
                "response.function_call_arguments.done",
                item_id=call["id"],
                output_index=index,
                name=call["name"],
                arguments=call["arguments"],
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]
        self.output.append(item)
        self.call = None
        return events

    def _finish(self) -> list[dict[str, Any]]:
        if self.finish_reason is None:  # the chunks ended without a finish: not an answer
            return self._fail({"message": "the stream ended without an answer", "code": "pipeline_unavailable"})
        events = self._close_text() + self._close_call()
        if not self.output:  # an empty answer is still a message (as the non-streamed response has)
            self.text = {"id": new_item_id("msg"), "text": ""}
            events += self._opened(self.text) + self._close_text()
        self.ended = True
        if self.finish_reason == "length":
            return events + [self._event("response.incomplete", response=self._response("incomplete"))]
        return events + [self._event("response.completed", response=self._response("completed"))]

    def _opened(self, text: dict[str, Any]) -> list[dict[str, Any]]:
        """The events that open message item `text` (its one output_text part)."""
        added = self._event(
            "response.output_item.added",
            output_index=len(self.output),
            item=message_item(text["id"], "", "in_progress") | {"content": []},
        )
        return [added, self._event("response.content_part.added", **self._where(text), part=_part(""))]

    def _fail(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        self.ended = True
        code, message = error.get("code") or "server_error", str(error.get("message") or "generation failed")
        return [
            self._event("error", code=code, message=message, param=error.get("param")),
            self._event("response.failed", response=self._response("failed", {"code": code, "message": message})),
        ]


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
