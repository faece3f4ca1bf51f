"""The OpenAI gateway in-process over a fake backend, driven by the official openai client."""

import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.protocol import (
    Accepted,
    Finished,
    GenerateEvent,
    GenerateRequest,
    PipelineInfo,
    Rejected,
    TextDelta,
)


class FakeBackend:
    """Answers 'hello world' in two deltas; rejects prompts containing 'overload' with a 503."""

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []

    def models(self) -> list[str]:
        return ["fake"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        self.requests.append(request)
        text = request.prompt or request.messages[-1].content
        if "overload" in text:
            yield Rejected(503, "busy", code="overloaded", retry_after_s=2)
            return
        yield Accepted(prompt_tokens=5)
        yield TextDelta("hello", 1)
        yield TextDelta(" world", 2)
        yield Finished("error" if "fail" in text else "stop", 5, 2, error="boom" if "fail" in text else None)

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r1", "n1", "float32", 6, 512, ())


@pytest.fixture()
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture()
def http(backend: FakeBackend) -> TestClient:
    return TestClient(create_gateway_app(Gateway(backend, [ModelCard("fake", "tests")]), max_body_bytes=4096))


@pytest.fixture()
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def chat_body(**extra: object) -> dict:
    return {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_models_and_chat_through_the_openai_client(client: openai.OpenAI, backend: FakeBackend) -> None:
    assert [m.id for m in client.models.list().data] == ["fake"]
    reply = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=7, temperature=0, seed=3, stop=["x"]
    )
    assert reply.choices[0].message.content == "hello world"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (5, 2, 7)
    sampling = backend.requests[-1].sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.seed, sampling.stop) == (7, 0.0, 3, ("x",))


def test_streaming_chat_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7


def test_completions_plain_and_streamed(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="fake", prompt="say", max_tokens=3)
    assert reply.choices[0].text == "hello world" and reply.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="fake", prompt="say", stream=True))
    assert streamed == "hello world"


def test_sse_framing_ends_with_done(http: TestClient) -> None:
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "body,param",
    [
        (chat_body(temperature=3), "temperature"),
        (chat_body(top_p=0), "top_p"),
        (chat_body(max_tokens=0), "max_tokens"),
        (chat_body(max_tokens="ten"), "max_tokens"),
        (chat_body(n=17), "n"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat_body(stream="yes"), "stream"),
        ({"model": "fake", "messages": []}, "messages"),
        ({"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "fake", "messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        (chat_body(unknown_field=1), "unknown_field"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(http: TestClient, body: dict, param: str) -> None:
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert error_of(response)["param"] == param


@pytest.mark.parametrize(
    "extra",
    [
        {"stream_options": {"include_usage": True}},
    ],
)
def test_unsupported_options_are_rejected_clearly(http: TestClient, extra: dict) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(**extra))
    assert response.status_code == 400
    assert "not supported" in error_of(response)["message"] or "stream" in error_of(response)["message"]


def test_unknown_model_is_404(http: TestClient) -> None:
    response = http.post("/v1/chat/completions", json={**chat_body(), "model": "nope"})
    assert response.status_code == 404 and error_of(response)["code"] == "model_not_found"


def test_malformed_json_is_400(http: TestClient) -> None:
    response = http.post(
        "/v1/chat/completions", content=b'{"model": "fake",', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"


def test_non_object_body_is_400(http: TestClient) -> None:
    response = http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert response.status_code == 400


def test_oversized_body_is_413_before_parsing(http: TestClient) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(user="u" * 5000))
    assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"


def test_replica_rejection_keeps_its_status_and_retry_after(http: TestClient) -> None:
    response = http.post(
        "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "overload"}]}
    )
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert error_of(response)["code"] == "overloaded"


def test_failed_generation_is_a_503_not_a_500(http: TestClient) -> None:
    response = http.post(
        "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "fail"}]}
    )
    assert response.status_code == 503


def test_unknown_route_and_method_are_openai_errors(http: TestClient) -> None:
    assert error_of(http.get("/v1/nothing"))["type"] == "not_found_error"
    assert http.get("/v1/chat/completions").status_code == 405


def test_healthz_reports_pipelines(http: TestClient) -> None:
    body = http.get("/healthz").json()
    assert body["status"] == "ok" and body["pipelines"][0]["model"] == "fake"


def test_openapi_schema_documents_the_request_models(http: TestClient) -> None:
    schema = http.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


class LosingBackend(FakeBackend):
    """The first `losses` streams die like a killed replica (after Accepted); later ones answer."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        from serve_apps.gateway.backend import PipelineLost

        if self.losses > 0:
            self.losses -= 1
            yield Accepted(prompt_tokens=5)
            yield TextDelta("hel", 1)
            raise PipelineLost("replica died")
        async for event in super().stream(request):
            yield event


def test_non_streamed_request_is_retried_when_its_replica_dies() -> None:
    backend = LosingBackend(losses=2)
    http = TestClient(create_gateway_app(Gateway(backend, [ModelCard("fake", "tests")])))
    response = http.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "hello world"
    assert len(backend.requests) == 1  # the two lost attempts never reached FakeBackend.stream


def test_stream_gets_an_error_event_not_a_hang_when_its_replica_dies() -> None:
    http = TestClient(create_gateway_app(Gateway(LosingBackend(losses=1), [ModelCard("fake", "tests")])))
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "pipeline_unavailable"


def test_replica_lost_every_time_is_a_503_with_retry_after() -> None:
    http = TestClient(create_gateway_app(Gateway(LosingBackend(losses=10), [ModelCard("fake", "tests")])))
    response = http.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 503 and response.headers["retry-after"] == "5"


def test_network_nodes_lists_the_registry_or_says_it_is_missing() -> None:
    async def nodes() -> list[dict]:
        return [{"node_id": "n1", "wallet": "W", "reputation": 0.5}]

    async def missing() -> list[dict]:
        raise LookupError("no provider registry is running")

    listed = TestClient(create_gateway_app(Gateway(FakeBackend(), [], network_nodes=nodes))).get("/v1/network/nodes")
    assert listed.status_code == 200 and listed.json()["data"][0]["wallet"] == "W"
    absent = TestClient(create_gateway_app(Gateway(FakeBackend(), [], network_nodes=missing))).get("/v1/network/nodes")
    assert absent.status_code == 503 and error_of(absent)["code"] == "registry_unavailable"


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/chat/completions", '{"model": "fake", "messages": [{"role": "user", "content": "a\\ud800"}]}', "content"),
        (
            "/v1/chat/completions",
            '{"model": "fake", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
            "content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "fake", "messages": [{"role": "user", "content": "x"}], "stop": "\\ud83d"}',
            "stop",
        ),
        ("/v1/completions", '{"model": "fake", "prompt": ["\\ud800"]}', "prompt"),
        ("/v1/completions", '{"model": "fake", "prompt": "x", "user": "\\ud800"}', "user"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(http: TestClient, path: str, raw: str, param: str) -> None:
    response = http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"].endswith(param) and "lone surrogate" in error["message"]
