"""Tools in the prompt: the chat template's own rendering when it knows tools, a documented fallback otherwise.

A template that uses the jinja variable `tools` (Qwen 2.5/3, Llama 3.1+, Hermes, Mistral's newer ones)
gets the OpenAI tool list as `tools=` and the history's tool calls and tool results as the messages it
expects (`tool_calls` with parsed arguments, role `tool`). A template without it (SmolLM2's) gets the
Hermes-style rendering that Qwen's templates also use, as plain text:

- a system message (the client's first system message, extended) listing the functions as JSON inside
  `<tools></tools>` and asking for `<tool_call>{"name": ..., "arguments": ...}</tool_call>`;
- an assistant turn's calls as `<tool_call>` blocks after its text;
- a tool result as a user turn `<tool_response>...</tool_response>`.

What the model writes back is parsed by serve_apps.gateway.tool_calls, which reads this format, Llama 3's
JSON and a bare JSON call.
"""

import json
from collections.abc import Sequence
from typing import Any

from serve_apps.protocol import ChatTurn

FALLBACK_TOOL_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def template_knows_tools(tokenizer: Any) -> bool:
    """The chat template renders a `tools` variable itself."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def template_messages(turns: Sequence[ChatTurn]) -> list[dict[str, Any]]:
    """The turns as a tool-aware template expects them (OpenAI's message shapes, arguments parsed)."""
    messages: list[dict[str, Any]] = []
    for turn in turns:
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.tool_calls:
            calls = json.loads(turn.tool_calls)
            message["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _arguments(call["function"]["arguments"])}}
                for call in calls
            ]
        if turn.tool_call_id is not None:
            message["tool_call_id"] = turn.tool_call_id
        if turn.name is not None and turn.role == "tool":
            message["name"] = turn.name
        messages.append(message)
    return messages


def fallback_messages(turns: Sequence[ChatTurn], tools_json: str | None) -> list[dict[str, str]]:
    """The turns as plain role/content text for a template without tools (the rendering described above)."""
    messages: list[dict[str, str]] = []
    for turn in turns:
        if turn.role == "tool":
            messages.append({"role": "user", "content": f"<tool_response>\n{turn.content}\n</tool_response>"})
        elif turn.tool_calls:
            blocks = [
                json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])})
                for c in json.loads(turn.tool_calls)
            ]
            text = "\n".join([turn.content] * bool(turn.content) + [f"<tool_call>\n{b}\n</tool_call>" for b in blocks])
            messages.append({"role": turn.role, "content": text})
        else:
            messages.append({"role": turn.role, "content": turn.content})
    if tools_json:
        tools = "\n".join(json.dumps(tool) for tool in json.loads(tools_json))
        prompt = FALLBACK_TOOL_PROMPT.format(tools=tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


def _arguments(arguments: str) -> Any:
    """A call's arguments (JSON text in OpenAI's messages) as the object templates print; text if not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
