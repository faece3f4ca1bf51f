"""Tools and structured outputs at the gateway: validation into 400s naming the field, the grammar a request
implies, answers parsed into tool calls (Hermes, Llama 3, bare JSON), and OpenAI's exact chunk shapes."""

import json
from collections.abc import AsyncIterator

import openai
import pytest
from fastapi.testclient import TestClient

from serve_apps.engine.messages import GrammarSpec
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.tool_calls import ToolCallStream, parse_tool_calls
from serve_apps.protocol import Accepted, Finished, GenerateEvent, GenerateRequest, PipelineInfo, TextDelta

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class ScriptedBackend:
    """Answers `answer` in pieces of 7 characters, one token each."""

    def __init__(self) -> None:
        self.answer = CALL
        self.requests: list[GenerateRequest] = []

    def models(self) -> list[str]:
        return ["fake", "cpp"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        self.requests.append(request)
        yield Accepted(prompt_tokens=5)
        pieces = [self.answer[i : i + 7] for i in range(0, len(self.answer), 7)]
        for count, piece in enumerate(pieces, 1):
            yield TextDelta(piece, count)
        yield Finished("stop", 5, len(pieces))

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r1", "n1", "float32", 6, 512, ())


@pytest.fixture()
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture()
def http(backend: ScriptedBackend) -> TestClient:
    cards = [ModelCard("fake", "tests"), ModelCard("cpp", "tests", backend="llamacpp")]
    return TestClient(create_gateway_app(Gateway(backend, cards)))


@pytest.fixture()
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def chat(**extra: object) -> dict:
    return {"model": "fake", "messages": [{"role": "user", "content": "Weather in Paris?"}], **extra}


def test_a_call_in_the_answer_is_returned_as_tool_calls(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    reply = client.chat.completions.create(**chat(tools=[WEATHER]))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.usage.completion_tokens == -(-len(CALL) // 7)  # the call's tokens are completion tokens, metered
    request = backend.requests[-1]
    assert request.tool_names() == {"get_weather"} and request.grammar is None  # auto: free text, parsed


def test_streamed_tool_calls_have_openais_chunk_shapes(http: TestClient) -> None:
    with http.stream("POST", "/v1/chat/completions", json=chat(tools=[WEATHER], stream=True)) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    deltas = [event["choices"][0]["delta"] for event in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    head = deltas[1]["tool_calls"][0]
    assert set(head) == {"index", "id", "type", "function"} and head["function"] == {
        "name": "get_weather",
        "arguments": "",
    }
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert deltas[2] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}
    assert all("content" not in d for d in deltas[1:])


def test_the_openai_client_reassembles_streamed_calls(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(**chat(tools=[WEATHER])) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_plain_text_streams_at_once_with_tools_offered(http: TestClient, backend: ScriptedBackend) -> None:
    backend.answer = "It is sunny in Paris today."
    with http.stream("POST", "/v1/chat/completions", json=chat(tools=[WEATHER], stream=True)) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    texts = [e["choices"][0]["delta"].get("content") for e in events[1:-1]]
    assert "".join(texts) == backend.answer and len(texts) > 1
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("choice", "names"),
    [("required", ["get_weather", "get_time"]), ({"type": "function", "function": {"name": "get_time"}}, ["get_time"])],
)
def test_a_forced_call_is_a_grammar_over_the_arguments(
    client: openai.OpenAI, backend: ScriptedBackend, choice: object, names: list[str]
) -> None:
    time_tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    client.chat.completions.create(**chat(tools=[WEATHER, time_tool], tool_choice=choice))
    grammar = backend.requests[-1].grammar
    assert grammar is not None and grammar.kind == "json_schema"
    schema = json.loads(grammar.schema or "")
    options = schema.get("anyOf", [schema])
    assert [o["properties"]["name"]["const"] for o in options] == names


def test_response_formats_become_grammars(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    client.chat.completions.create(**chat(response_format={"type": "json_object"}))
    assert backend.requests[-1].grammar == GrammarSpec("json_object")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    client.chat.completions.create(**chat(response_format=fmt))
    assert backend.requests[-1].grammar == GrammarSpec("json_schema", json.dumps(schema))
    client.chat.completions.create(**chat(response_format={"type": "text"}, tools=[WEATHER], tool_choice="none"))
    assert backend.requests[-1].grammar is None and backend.requests[-1].tools is None


def test_history_with_calls_and_results_reaches_the_replica(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    backend.answer = "It is 21 degrees."
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    reply = client.chat.completions.create(model="fake", messages=messages, tools=[WEATHER])
    assert reply.choices[0].message.content == "It is 21 degrees."
    turns = backend.requests[-1].messages or ()
    assert json.loads(turns[1].tool_calls or "")[0]["id"] == "call_1"
    assert turns[2].role == "tool" and turns[2].tool_call_id == "call_1"


def _deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def _tool(name: str = "f", parameters: object = None) -> dict:
    function: dict = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [_tool("bad name!")]}, "tools.0.function.name"),
        ({"tools": [_tool("x" * 65)]}, "tools.0.function.name"),
        ({"tools": [_tool(f"f{i}") for i in range(129)]}, "tools"),
        ({"tools": [_tool(parameters={"type": "no-such-type"})]}, "tools.0.function.parameters"),
        ({"tools": [_tool(parameters=_deep(20))]}, "tools.0.function.parameters"),
        ({"tools": [_tool(parameters={"description": "d" * 40_000})]}, "tools.0.function.parameters"),
        ({"tools": [_tool(), _tool()]}, None),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"tool_choice": "required"}, None),
        ({"tools": [_tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}}, None),
        ({"tools": [_tool()], "tool_choice": "sometimes"}, "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0"),
    ],
)
def test_bad_tool_and_format_fields_are_400s(http: TestClient, extra: dict, param: str | None) -> None:
    response = http.post("/v1/chat/completions", json=chat(**extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert (error["param"] or "").startswith(param), error


def test_other_backends_refuse_tools_and_formats_naming_themselves(http: TestClient) -> None:
    for extra in ({"tools": [WEATHER]}, {"response_format": {"type": "json_object"}}):
        response = http.post("/v1/chat/completions", json={**chat(**extra), "model": "cpp"})
        assert response.status_code == 400
        assert "llamacpp backend" in response.json()["error"]["message"]
        assert response.json()["error"]["code"] == "unsupported_on_backend"


@pytest.mark.parametrize(
    "text",
    [
        CALL,
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]',
    ],
)
def test_each_family_format_parses_to_the_same_call(text: str) -> None:
    content, (call,) = parse_tool_calls(text, {"get_weather"})
    assert content is None and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_parallel_calls_text_before_and_unknown_functions() -> None:
    two = f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Rome')}"
    content, calls = parse_tool_calls(two, {"get_weather"})
    assert content == "Let me check." and [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    assert len(parse_tool_calls(two, {"get_weather"}, parallel=False)[1]) == 1
    assert parse_tool_calls(CALL, {"other"}) == (CALL, [])
    assert parse_tool_calls("{not json", {"get_weather"}) == ("{not json", [])


def test_the_stream_holds_what_may_be_a_call_and_passes_text() -> None:
    stream = ToolCallStream({"get_weather"})
    assert stream.feed("  <tool") == "" and stream.feed("_call>") == ""
    assert stream.feed('{"name": "get_weather", "arguments": {}}</tool_call>') == ""
    content, calls = stream.finish()
    assert content is None and calls[0].name == "get_weather"
    text = ToolCallStream({"get_weather"})
    assert text.feed("Hel") == "Hel" and text.feed("lo") == "lo" and text.finish() == (None, [])


def test_a_call_after_some_text_is_held_from_its_tag_on() -> None:
    stream = ToolCallStream({"get_weather"})
    sent = [stream.feed(part) for part in ["Let me look ", "that up. <tool", "_call>\n", CALL[12:]]]
    assert "".join(sent) == "Let me look that up. "
    content, calls = stream.finish()
    assert content is None and [c.name for c in calls] == ["get_weather"]
    partial = ToolCallStream({"get_weather"})
    assert partial.feed("a <") == "a " and partial.feed("b") == "<b" and partial.finish() == (None, [])
    unparsed = ToolCallStream({"get_weather"})
    assert unparsed.feed("x <tool_call>nope") == "x " and unparsed.finish() == ("<tool_call>nope", [])
