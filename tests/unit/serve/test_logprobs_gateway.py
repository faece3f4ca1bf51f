"""Logprobs and n > 1 in OpenAI's exact shapes, through the gateway over a fake replica, read by the openai client."""

import json
import math
from collections.abc import AsyncIterator

import openai
import pytest
from fastapi.testclient import TestClient

from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.logprobs import CompletionLogprobs
from serve_apps.protocol import Accepted, ChoiceEnd, Finished, GenerateEvent, GenerateRequest, TextDelta, TokenScore
from tests.unit.serve.test_gateway import FakeBackend, chat_body, error_of


def score(token: str, logprob: float, k: int) -> TokenScore:
    top = tuple(TokenScore(alt, logprob - i, tuple(alt.encode())) for i, alt in enumerate([token, "x", "y"][:k]))
    return TokenScore(token, logprob, tuple(token.encode()), top)


class ScoringBackend(FakeBackend):
    """Per choice: 'hello' and ' world' with logprobs (when asked); choice i ends 'length' for odd i."""

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        self.requests.append(request)
        k = request.sampling.logprobs
        yield Accepted(prompt_tokens=5)
        total = 0
        for index in range(request.n):
            for token, logprob in (("hello", -0.5), (" world", -1.25)):
                total += 1
                scores = (score(token, logprob, k),) if k is not None else ()
                yield TextDelta(token, total, scores, index)
            if request.n > 1:
                yield ChoiceEnd(index, "length" if index % 2 else "stop")
        yield Finished("stop", 5, total)


@pytest.fixture()
def backend() -> ScoringBackend:
    return ScoringBackend()


@pytest.fixture()
def http(backend: ScoringBackend) -> TestClient:
    return TestClient(create_gateway_app(Gateway(backend, [ModelCard("fake", "tests")]), max_body_bytes=1 << 16))


@pytest.fixture()
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def test_chat_logprobs_shape(client: openai.OpenAI, backend: ScoringBackend) -> None:
    reply = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2
    )
    assert backend.requests[-1].sampling.logprobs == 2
    content = reply.choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [
        ("hello", -0.5, list(b"hello")),
        (" world", -1.25, list(b" world")),
    ]
    assert [t.token for t in content[0].top_logprobs] == ["hello", "x"]
    assert reply.choices[0].logprobs.refusal is None


def test_chat_logprobs_without_top(client: openai.OpenAI, backend: ScoringBackend) -> None:
    reply = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert backend.requests[-1].sampling.logprobs == 0
    assert [c.top_logprobs for c in reply.choices[0].logprobs.content] == [[], []]


def test_no_logprobs_unless_asked(client: openai.OpenAI, backend: ScoringBackend) -> None:
    reply = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].logprobs is None and backend.requests[-1].sampling.logprobs is None


def test_streamed_chat_logprobs(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1, stream=True
        )
    )
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [("hello", -0.5), (" world", -1.25)]
    assert all(len(e.top_logprobs) == 1 for e in entries)


def test_completion_logprobs_legacy_shape(http: TestClient) -> None:
    body = http.post("/v1/completions", json={"model": "fake", "prompt": "x", "logprobs": 2}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["hello", " world"]
    assert logprobs["token_logprobs"] == [-0.5, -1.25]
    assert logprobs["text_offset"] == [0, 5]
    assert logprobs["top_logprobs"][0] == {"hello": -0.5, "x": -1.5}
    assert logprobs["top_logprobs"][1] == {" world": -1.25, "x": -2.25}  # the sampled token is always there


def test_streamed_completion_offsets_run_across_chunks(http: TestClient) -> None:
    with http.stream(
        "POST", "/v1/completions", json={"model": "fake", "prompt": "x", "logprobs": 0, "stream": True}
    ) as r:
        lines = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [c["choices"][0]["logprobs"] for c in lines if c["choices"] and c["choices"][0]["logprobs"]]
    assert [p["text_offset"] for p in parts] == [[0], [5]]
    assert [p["top_logprobs"] for p in parts] == [[{"hello": -0.5}], [{" world": -1.25}]]


def test_completion_logprobs_offsets_count_characters() -> None:
    part = CompletionLogprobs()
    first = part.part([TokenScore("é", -1.0, (0xC3, 0xA9)), TokenScore("ab", -2.0, (97, 98))])
    assert first["text_offset"] == [0, 1] and part.part([TokenScore("c", -3.0, (99,))])["text_offset"] == [3]


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 3}, None),  # top_logprobs without logprobs
        ({"top_logprobs": 3, "logprobs": False}, None),
        ({"logprobs": 1}, "logprobs"),  # chat's logprobs is a boolean
        ({"logprobs": "true"}, "logprobs"),
        ({"top_logprobs": 2.5, "logprobs": True}, "top_logprobs"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": "2"}, "n"),
    ],
)
def test_bad_logprobs_and_n_are_400(http: TestClient, extra: dict, param: str | None) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(**extra))
    assert response.status_code == 400, response.text
    if param is not None:
        assert error_of(response)["param"] == param


@pytest.mark.parametrize("logprobs", [-1, 6, True, 2.0, "1"])
def test_bad_completion_logprobs_are_400(http: TestClient, logprobs: object) -> None:
    response = http.post("/v1/completions", json={"model": "fake", "prompt": "x", "logprobs": logprobs})
    assert response.status_code == 400 and error_of(response)["param"] == "logprobs"


def test_logprob_values_are_json_numbers(http: TestClient) -> None:
    body = http.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2)).json()
    values = [e["logprob"] for e in body["choices"][0]["logprobs"]["content"]]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)
