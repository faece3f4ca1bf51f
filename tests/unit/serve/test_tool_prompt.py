"""Tools in the prompt: SmolLM2's template has no `tools`, so the Hermes-style fallback renders them as text;
a template that knows tools gets them (and the history's calls and results) in its own variables."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cluster.models.materialize import tokenizer_dir
from serve_apps.protocol import ChatTurn
from serve_apps.server.tokenization import encode_chat
from serve_apps.server.tool_prompt import fallback_messages, template_knows_tools, template_messages

TOOLS = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
CALLS = json.dumps(
    [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
)
HISTORY = (
    ChatTurn("user", "Weather in Paris?"),
    ChatTurn("assistant", "", tool_calls=CALLS),
    ChatTurn("tool", '{"temp_c": 21}', tool_call_id="call_1"),
)


@pytest.fixture(scope="module")
def tokenizer(model_cache_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tokenizer_dir(model_cache_dir))


def test_fallback_renders_tools_calls_and_results_as_text(tokenizer: PreTrainedTokenizerBase) -> None:
    assert not template_knows_tools(tokenizer)
    messages = fallback_messages(HISTORY, TOOLS)
    assert messages[0]["role"] == "system" and "<tools>" in messages[0]["content"]
    assert '"name": "get_weather"' in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": '<tool_response>\n{"temp_c": 21}\n</tool_response>'}
    text = tokenizer.decode(encode_chat(tokenizer, HISTORY, TOOLS))
    assert "<tool_response>" in text and text.endswith("<|im_start|>assistant\n")


def test_a_client_system_message_is_extended_not_replaced() -> None:
    messages = fallback_messages((ChatTurn("system", "Be brief."), ChatTurn("user", "hi")), TOOLS)
    assert messages[0]["content"].startswith("Be brief.\n\n") and "<tools>" in messages[0]["content"]
    assert fallback_messages((ChatTurn("user", "hi"),), None) == [{"role": "user", "content": "hi"}]


def test_template_messages_carry_parsed_arguments_and_call_ids() -> None:
    messages = template_messages(HISTORY)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1"}
