"""A model's answer parsed into OpenAI tool calls, whole or while it streams.

Formats read, in this order:

- Hermes / Qwen 2.5+ (and SolanaLM's fallback prompt, serve_apps/server/tool_prompt.py):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call, text before them is content;
- Llama 3.1+ JSON: `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`), several
  separated by `;`;
- a bare JSON call or list of calls `{"name": ..., "arguments": ...}` (what a forced call's grammar makes).

Only calls of functions the request offered count; an answer with none stays text. Hand-written because
these formats are a few lines each and no maintained library parses them outside a serving engine.
"""

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)
PYTHON_TAG = "<|python_tag|>"
MARKERS = ("<tool_call>", PYTHON_TAG, "{", "[")  # how an answer that is a call can begin


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, names: set[str], parallel: bool = True) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of an answer: calls of `names` found in it, and the text that is not a call."""
    if "<tool_call>" in text:
        content = text[: text.index("<tool_call>")].strip() or None
        calls = [c for block in HERMES.findall(text) for c in _calls(block, names)]
    else:
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        content = None
        calls = [c for part in _json_parts(body) for c in _calls(part, names)]
    if not calls:
        return text, []
    calls = calls if parallel else calls[:1]
    return content, [ParsedCall(c.name, c.arguments, new_call_id()) for c in calls]


def _json_parts(body: str) -> list[str]:
    if not body.startswith(("{", "[")):
        return []
    try:
        json.loads(body)
        return [body]
    except ValueError:
        return [part.strip() for part in body.split(";") if part.strip()]  # Llama 3: calls separated by ';'


def _calls(block: str, names: set[str]) -> list[ParsedCall]:
    try:
        value = json.loads(block)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            continue
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                continue
        if isinstance(arguments, dict):
            calls.append(ParsedCall(item["name"], json.dumps(arguments)))
    return calls


class ToolCallStream:
    """Streams an answer that may hold tool calls: text goes out as it comes once it cannot be a call; an
    answer that begins like a call is held, and so is everything from a `<tool_call>` written after some
    text; what is held is parsed when the answer ends."""

    def __init__(self, names: set[str], parallel: bool = True) -> None:
        self.names, self.parallel = names, parallel
        self.buffer = ""  # held: the answer so far (undecided) or everything from a <tool_call> on
        self.tail = ""  # text mode: the end of the text so far that may be the start of "<tool_call>"
        self.text_mode = False

    def feed(self, text: str) -> str:
        """The content to send now ("" while holding)."""
        if self.text_mode:
            return self._text(text)
        self.buffer += text
        head = self.buffer.lstrip()
        if not head or any(m.startswith(head) or head.startswith(m) for m in MARKERS):
            return ""
        self.text_mode = True
        held, self.buffer = self.buffer, ""
        return self._text(held)

    def _text(self, text: str) -> str:
        if self.buffer:  # a call began after some text: hold the rest
            self.buffer += text
            return ""
        text, self.tail = self.tail + text, ""
        if "<tool_call>" in text:
            at = text.index("<tool_call>")
            self.buffer = text[at:]
            return text[:at]
        keep = next((n for n in range(min(len(text), 10), 0, -1) if "<tool_call>".startswith(text[-n:])), 0)
        if keep:
            text, self.tail = text[:-keep], text[-keep:]
        return text

    def finish(self) -> tuple[str | None, list[ParsedCall]]:
        """What is left at the end: (content not yet sent, calls)."""
        if not self.buffer:
            return self.tail or None, []
        content, calls = parse_tool_calls(self.buffer, self.names, self.parallel)
        return (self.tail + content if content else self.tail or None), calls
