"""Penalties, logit_bias, max_completion_tokens and stream_options through the gateway: validated into 400s
naming the field, forwarded into the engine's SamplingParams, and refused naming the backend off the
pipeline backend."""

import json

import pytest
from fastapi.testclient import TestClient

from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from tests.unit.serve.test_gateway import FakeBackend, chat_body, error_of


class TwoModels(FakeBackend):
    def models(self) -> list[str]:
        return ["fake", "gguf"]


@pytest.fixture()
def backend() -> FakeBackend:
    return TwoModels()


@pytest.fixture()
def http(backend: FakeBackend) -> TestClient:
    cards = [ModelCard("fake", "tests"), ModelCard("gguf", "tests", backend="llamacpp")]
    return TestClient(create_gateway_app(Gateway(backend, cards), max_body_bytes=1 << 16))


def test_penalties_and_bias_reach_the_sampling_params(http: TestClient, backend: FakeBackend) -> None:
    body = chat_body(presence_penalty=1.5, frequency_penalty=-2, logit_bias={"50": -100, "7": 3.5, "007": 4})
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    sampling = backend.requests[-1].sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (1.5, -2.0)
    assert sampling.logit_bias == ((7, 4.0), (50, -100.0))  # sorted by id; "007" is token 7 again


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"5": "x"}}, "logit_bias.5"),
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"logit_bias": {"hello": 1}}, "logit_bias"),
        ({"logit_bias": {"١٢": 1}}, "logit_bias"),  # Arabic-Indic digits are decimal to str.isdecimal
        ({"logit_bias": {"9" * 12: 1}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, None),
        ({"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage"),
        ({"stream_options": {"include_usage": True, "other": 1}, "stream": True}, "stream_options.other"),
    ],
)
def test_bad_sampling_fields_are_400(http: TestClient, extra: dict, param: str | None) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(**extra))
    assert response.status_code == 400, response.text
    if param is not None:
        assert error_of(response)["param"] == param


def test_300_bias_entries_are_accepted(http: TestClient) -> None:
    body = chat_body(logit_bias={str(i): -1 for i in range(300)})
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_max_completion_tokens_is_max_tokens(http: TestClient, backend: FakeBackend) -> None:
    assert http.post("/v1/chat/completions", json=chat_body(max_completion_tokens=9)).status_code == 200
    assert backend.requests[-1].sampling.max_tokens == 9
    same = chat_body(max_completion_tokens=4, max_tokens=4)
    assert http.post("/v1/chat/completions", json=same).status_code == 200
    assert backend.requests[-1].sampling.max_tokens == 4


def test_completions_take_penalties_too(http: TestClient, backend: FakeBackend) -> None:
    body = {"model": "fake", "prompt": "x", "presence_penalty": 0.5, "logit_bias": {"3": 1}}
    assert http.post("/v1/completions", json=body).status_code == 200
    assert backend.requests[-1].sampling.logit_bias == ((3, 1.0),)


def sse_chunks(http: TestClient, body: dict) -> list[dict]:
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_include_usage_nulls_usage_until_the_last_chunk(http: TestClient) -> None:
    chunks = sse_chunks(http, chat_body(stream=True, stream_options={"include_usage": True}))
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7
    plain = sse_chunks(http, chat_body(stream=True))
    assert all("usage" not in c for c in plain) and all(c["choices"] for c in plain)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"logprobs": True}, "logprobs"),
        ({"n": 2}, "n"),
    ],
)
def test_other_backends_refuse_naming_themselves(http: TestClient, extra: dict, param: str) -> None:
    response = http.post("/v1/chat/completions", json={**chat_body(**extra), "model": "gguf"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param and "llamacpp backend" in error["message"]
    assert error["code"] == "unsupported_on_backend"


def test_other_backends_take_neutral_values(http: TestClient) -> None:
    body = {**chat_body(presence_penalty=0, logit_bias={}, n=1, logprobs=False), "model": "gguf"}
    assert http.post("/v1/chat/completions", json=body).status_code != 400
