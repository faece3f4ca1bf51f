"""The Responses API (issue 20): a Responses request translated into the chat path (messages, tools, grammar,
limits), Response objects and streamed events in OpenAI's names and order as the openai client parses them,
validation attacks answered 400 in OpenAI's error format, metering through the same holds, and the OpenAI
Agents SDK's OpenAIResponsesModel running a tool loop against the in-process gateway."""

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from serve_apps.engine.messages import GrammarSpec
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.metering import Metering
from serve_apps.gateway.responses_output import ResponseEvents
from serve_apps.protocol import Accepted, ChatTurn, Finished, GenerateEvent, GenerateRequest, PipelineInfo, TextDelta
from tests.unit.serve.test_metering import FakePayments

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city", "parameters": PARAMS}


class ScriptedBackend:
    """Answers each request with the next of `answers` (the last one repeats), 7 characters per token;
    `finish` is the finish reason ("error" fails the generation)."""

    def __init__(self) -> None:
        self.answers = ["Hello there, friend."]
        self.finish = "stop"
        self.requests: list[GenerateRequest] = []

    def models(self) -> list[str]:
        return ["fake", "cpp"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        answer = self.answers[min(len(self.requests), len(self.answers) - 1)]
        self.requests.append(request)
        yield Accepted(prompt_tokens=5)
        pieces = [answer[i : i + 7] for i in range(0, len(answer), 7)]
        for count, piece in enumerate(pieces, 1):
            yield TextDelta(piece, count)
        yield Finished(self.finish, 5, len(pieces), error="boom" if self.finish == "error" else None)

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r1", "n1", "float32", 6, 512, ())


CARDS = [ModelCard("fake", "tests"), ModelCard("cpp", "tests", backend="llamacpp")]


@pytest.fixture()
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture()
def http(backend: ScriptedBackend) -> TestClient:
    return TestClient(create_gateway_app(Gateway(backend, CARDS), max_body_bytes=200_000))


@pytest.fixture()
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def events_of(http: TestClient, **body: object) -> list[dict]:
    """The streamed events' data, checking each `event:` line names its data's type."""
    with http.stream("POST", "/v1/responses", json={"model": "fake", "stream": True, **body}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_text_answer_through_the_openai_client(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    reply = client.responses.create(
        model="fake", input="hi", instructions="Be brief.", max_output_tokens=9, temperature=0, metadata={"k": "v"}
    )
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.status == "completed"
    assert reply.output_text == "Hello there, friend." and reply.output[0].type == "message"
    assert reply.output[0].content[0].annotations == []
    assert reply.usage and (reply.usage.input_tokens, reply.usage.output_tokens, reply.usage.total_tokens) == (5, 3, 8)
    assert reply.metadata == {"k": "v"} and reply.instructions == "Be brief." and reply.store is False
    request = backend.requests[-1]
    assert request.messages == (ChatTurn("system", "Be brief."), ChatTurn("user", "hi"))
    assert (request.sampling.max_tokens, request.sampling.temperature, request.grammar) == (9, 0.0, None)


def test_input_items_become_the_chat_history(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    items = [
        {"role": "developer", "content": "Use tools."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Paris?"}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
            "id": "msg_1",
            "status": "completed",
        },
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "21 C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "25 C"}]},
    ]
    client.responses.create(model="fake", input=items, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    turns = backend.requests[-1].messages
    assert [(t.role, t.content) for t in turns] == [
        ("system", "Use tools."),
        ("user", "Weather in Paris?"),
        ("assistant", "Checking."),
        ("tool", "21 C"),
        ("tool", "25 C"),
    ]
    calls = json.loads(turns[2].tool_calls or "")
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}'),
        ("call_2", "get_weather", '{"city":"Rome"}'),
    ]
    assert (turns[3].tool_call_id, turns[4].tool_call_id) == ("call_1", "call_2")
    assert backend.requests[-1].tool_names() == {"get_weather"}


def test_a_call_is_a_function_call_item(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    backend.answers = [CALL]
    reply = client.responses.create(model="fake", input="Weather?", tools=[WEATHER])  # type: ignore[list-item]
    (call,) = reply.output
    assert call.type == "function_call" and call.id and call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.status == "completed"
    assert reply.tools[0].type == "function" and reply.tool_choice == "auto" and reply.parallel_tool_calls is True


def test_text_format_and_tool_choice_take_the_grammar_path(client: openai.OpenAI, backend: ScriptedBackend) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}}
    reply = client.responses.create(model="fake", input="x", text=fmt)  # type: ignore[arg-type]
    assert backend.requests[-1].grammar == GrammarSpec("json_schema", json.dumps(schema))
    assert reply.text.format.type == "json_schema"
    client.responses.create(model="fake", input="x", text={"format": {"type": "json_object"}})
    assert backend.requests[-1].grammar == GrammarSpec("json_object")
    client.responses.create(
        model="fake",
        input="x",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
    )
    request = backend.requests[-1]
    assert request.grammar is not None and '"const": "get_weather"' in (request.grammar.schema or "")
    assert request.parallel_tool_calls is False


def test_a_length_stop_is_incomplete(client: openai.OpenAI, backend: ScriptedBackend, http: TestClient) -> None:
    backend.finish = "length"
    reply = client.responses.create(model="fake", input="hi", max_output_tokens=3)
    assert reply.status == "incomplete" and reply.incomplete_details
    assert reply.incomplete_details.reason == "max_output_tokens" and reply.output[0].status == "incomplete"
    events = events_of(http, input="hi", max_output_tokens=3)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_streamed_text_events_in_openais_order(http: TestClient) -> None:
    events = events_of(http, input="hi")
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id for e in events[3:9])
    assert "".join(e["delta"] for e in events[4:7]) == events[7]["text"] == "Hello there, friend."
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello there, friend."
    assert final["usage"]["output_tokens"] == 3 and final["id"] == events[0]["response"]["id"]


def test_streamed_call_events_and_the_sdk_stream_helper(
    http: TestClient, client: openai.OpenAI, backend: ScriptedBackend
) -> None:
    backend.answers = ["Let me see. " + CALL]
    events = events_of(http, input="Weather?", tools=[WEATHER])
    kinds = [e["type"] for e in events]
    assert kinds[kinds.index("response.output_item.done") + 1 :] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-3]
    assert (done["name"], json.loads(done["arguments"]), done["output_index"]) == ("get_weather", {"city": "Paris"}, 1)
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["message", "function_call"]
    with client.responses.stream(model="fake", input="Weather?", tools=[WEATHER]) as stream:  # type: ignore[list-item]
        final = stream.get_final_response()
    assert final.output_text.strip() == "Let me see." and final.output[1].type == "function_call"


def test_a_failed_generation_streams_error_then_failed(http: TestClient, backend: ScriptedBackend) -> None:
    backend.finish = "error"
    events = events_of(http, input="hi")
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "pipeline_unavailable" and "boom" in events[-2]["message"]
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["code"]


def test_event_machine_sequences_and_ignores_chunks_after_the_end() -> None:
    machine = ResponseEvents("resp_1", {"model": "m"}, created_at=1)
    started = machine.start()
    assert [e["sequence_number"] for e in started] == [0, 1]
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    assert machine.feed(finish) == []
    ended = machine.feed("[DONE]")  # an empty answer is still one (empty) message item
    assert [e["type"] for e in ended][-1] == "response.completed"
    assert ended[-1]["response"]["output"][0]["content"][0]["text"] == ""
    assert machine.feed("[DONE]") == [] and machine.feed(finish) == []
    broken = ResponseEvents("resp_2", {"model": "m"}, created_at=1)
    assert [e["type"] for e in broken.feed("[DONE]")] == ["error", "response.failed"]  # no finish: not an answer


LONG = "x" * 70
BAD_BODIES = [
    ({"input": "hi", "bogus": 1}, "bogus"),
    ({"input": "hi", "store": True}, "store"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "include": ["file_search_call.results"]}, "include"),
    ({"input": "hi", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": "hi", "prompt": {"id": "p"}}, "prompt"),
    ({"input": "hi", "truncation": "auto"}, "truncation"),
    ({"input": "hi", "top_logprobs": 3}, "top_logprobs"),
    ({"input": 7}, "input"),
    ({"input": []}, "input"),
    ({"input": "\ud800"}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input.0.message.role"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input.0.message.content.0",
    ),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "\udfff"}]}]}, "input.0.message.content"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.function_call.call_id"),
    (
        {"input": [{"type": "function_call", "call_id": "c", "name": "bad name", "arguments": "{}"}]},
        "input.0.function_call.name",
    ),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "input.0.function_call_output.output"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0"),
    ({"input": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools.0.name"),
    (
        {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "nope"}}]},
        "tools.0.parameters",
    ),
    ({"input": "hi", "tools": [{"type": "function", "name": f"f{i}"} for i in range(129)]}, "tools"),
    ({"input": "hi", "tools": [WEATHER, WEATHER]}, None),
    ({"input": "hi", "tool_choice": {"type": "function", "name": "get_weather"}}, None),
    ({"input": "hi", "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": "hi", "tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "t"}}}, "text.format.json_schema.schema"),
    ({"input": "hi", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": "9"}, "max_output_tokens"),
    ({"input": "hi", "temperature": 3}, "temperature"),
    ({"input": "hi", "stream": "yes"}, "stream"),
    ({"input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"input": "hi", "metadata": {LONG: "v"}}, "metadata"),
    ({"input": "hi", "metadata": {"k": 1}}, "metadata.k"),
    ({"input": "hi", "user": ["x"]}, "user"),
]


@pytest.mark.parametrize(("extra", "param"), BAD_BODIES)
def test_bad_requests_are_400_naming_the_field(http: TestClient, extra: dict, param: str | None) -> None:
    body = json.dumps({"model": "fake", **extra})  # ASCII: a lone surrogate goes as its JSON escape
    response = http.post("/v1/responses", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param or ""), error
    assert param is not None or error["param"] is None, error


def test_nested_schema_oversized_body_unknown_model_and_backend(http: TestClient) -> None:
    deep: dict = {"type": "object"}
    for _ in range(20):
        deep = {"type": "object", "properties": {"a": deep}}
    tool = {"type": "function", "name": "f", "parameters": deep}
    response = http.post("/v1/responses", json={"model": "fake", "input": "hi", "tools": [tool]})
    assert response.status_code == 400 and "deeper" in response.json()["error"]["message"]
    assert http.post("/v1/responses", json={"model": "fake", "input": "x" * 300_000}).status_code == 413
    missing = http.post("/v1/responses", json={"model": "nope", "input": "hi"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    other = http.post("/v1/responses", json={"model": "cpp", "input": "hi", "tools": [WEATHER]})
    assert other.status_code == 400 and other.json()["error"]["code"] == "unsupported_on_backend"
    assert http.post("/v1/responses", content=b"{", headers={"content-type": "application/json"}).status_code == 400


def test_responses_are_held_and_settled_like_chat() -> None:
    payments = FakePayments()
    gateway = Gateway(ScriptedBackend(), CARDS, metering=Metering(payments))
    http = TestClient(create_gateway_app(gateway))
    body = {"model": "fake", "input": "hi", "max_output_tokens": 6}
    assert http.post("/v1/responses", json=body).status_code == 401
    reply = http.post("/v1/responses", json=body, headers={"Authorization": "Bearer rich"})
    assert reply.status_code == 200 and reply.headers["x-solanalm-settlement-id"] == reply.json()["settlement_id"]
    key = {"Authorization": "Bearer rich"}
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}, headers=key) as streamed:
        text = "".join(streamed.iter_text())
    final = json.loads(text.strip().split("\n\n")[-1].split("\n")[1].removeprefix("data: "))
    assert final["type"] == "response.completed" and final["response"]["settlement_id"] == "set_2"
    assert [(h.max_tokens, h.request_id[:5]) for h in payments.holds] == [(6, "resp_")] * 2
    assert [(r.prompt_tokens, r.completion_tokens) for r in payments.reports] == [(5, 3), (5, 3)]
    assert not payments.released


def test_openai_agents_sdk_tool_loop_over_responses() -> None:
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    backend = ScriptedBackend()
    backend.answers = [CALL, "It is 21 degrees in Paris."]
    app = create_gateway_app(Gateway(backend, CARDS))
    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"It is 21 degrees and sunny in {city}."

    async def run() -> object:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport) as http_client:
            client = AsyncOpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http_client)
            model = agents.OpenAIResponsesModel(model="fake", openai_client=client)
            agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model=model)
            return await agents.Runner.run(agent, "Weather in Paris?", max_turns=3)

    result = asyncio.run(run())
    assert seen == ["Paris"] and result.final_output == "It is 21 degrees in Paris."  # type: ignore[attr-defined]
    turns = backend.requests[-1].messages
    assert turns[-1].role == "tool" and turns[-1].content == "It is 21 degrees and sunny in Paris."  # its result
    assert turns[-2].role == "assistant" and json.loads(turns[-2].tool_calls or "")[0]["id"] == turns[-1].tool_call_id
