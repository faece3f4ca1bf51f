"""Property-based fuzz of the request schema: whatever the body, the gateway answers 2xx or 4xx, never 5xx."""

import json

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from tests.unit.serve.test_gateway import FakeBackend

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
CHAT_FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
    "ignore_eos",
]
NAME = st.sampled_from(["get_weather", "f", "bad name", "x" * 65, ""]) | st.text(max_size=8)
SCHEMA = JSON | st.fixed_dictionaries(
    {"type": st.sampled_from(["object", "string", "nope"]) | JSON},
    optional={"properties": st.dictionaries(st.text(max_size=5), JSON, max_size=3), "required": JSON},
)
FUNCTION = st.fixed_dictionaries(
    {"name": NAME | JSON}, optional={"parameters": SCHEMA, "description": JSON, "strict": JSON}
)
TOOL = st.fixed_dictionaries({"type": st.just("function") | JSON, "function": FUNCTION | JSON})
TOOL_CHOICE = st.sampled_from(["none", "auto", "required", "maybe"]) | st.fixed_dictionaries(
    {"type": st.just("function") | JSON, "function": st.fixed_dictionaries({"name": NAME})}
)
RESPONSE_FORMAT = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"]) | JSON},
    optional={"json_schema": st.fixed_dictionaries({"name": NAME, "schema": SCHEMA}, optional={"strict": JSON})},
)
CALL = st.fixed_dictionaries(
    {
        "id": st.text(max_size=8) | JSON,
        "type": st.just("function") | JSON,
        "function": st.fixed_dictionaries({"name": NAME, "arguments": st.text(max_size=20) | JSON}),
    }
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "wizard"]) | JSON,
        "content": st.none() | st.text(max_size=30) | JSON,
    },
    optional={"tool_calls": st.lists(CALL, max_size=2) | JSON, "tool_call_id": st.text(max_size=8) | JSON},
)
BIAS_KEY = st.integers(-5, 10**10).map(str) | st.sampled_from(["", "1e3", "٣", " 7", "0x10"]) | st.text(max_size=4)
VALUES = {
    "logit_bias": st.dictionaries(BIAS_KEY, st.floats(-150, 150) | JSON, max_size=4) | JSON,
    "n": st.integers(-1, 20) | JSON,
    "top_logprobs": st.integers(-1, 25) | JSON,
    "logprobs": st.integers(-1, 8) | st.booleans() | JSON,
    "model": st.sampled_from(["fake", "nope"]) | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "tools": st.lists(TOOL, max_size=3) | JSON,
    "tool_choice": TOOL_CHOICE | JSON,
    "response_format": RESPONSE_FORMAT | JSON,
}
BODY = st.dictionaries(
    st.sampled_from(CHAT_FIELDS + ["prompt", "echo", "suffix", "best_of", "bogus"]), JSON, max_size=8
).flatmap(lambda extra: st.fixed_dictionaries({k: VALUES.get(k, JSON) for k in extra}))

client = TestClient(create_gateway_app(Gateway(FakeBackend(), [ModelCard("fake", "tests")])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODY, route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_no_body_gets_a_server_error(body: dict, route: str) -> None:
    response = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=200))
def test_no_raw_bytes_get_a_server_error(raw: bytes) -> None:
    response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500


def _request_validator(route: str):  # type: ignore[no-untyped-def]
    """A JSON-Schema validator of the request body `route` declares in the served /openapi.json."""
    from jsonschema import Draft202012Validator
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    document = client.get("/openapi.json").json()
    body = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    registry = Registry().with_resource("urn:openapi", DRAFT202012.create_resource(document))
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **_rebase(body)}
    return Draft202012Validator(schema, registry=registry)


def _rebase(node):  # type: ignore[no-untyped-def]
    """Point `#/components/...` references at the registered OpenAPI document."""
    if isinstance(node, dict):
        return {k: ("urn:openapi" + v if k == "$ref" else _rebase(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v) for v in node]
    return node


VALIDATORS = {route: _request_validator(route) for route in ("/v1/chat/completions", "/v1/completions")}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODY, route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_openapi_schema_matches_what_is_accepted(body: dict, route: str) -> None:
    """What /openapi.json rejects is answered 4xx; what is answered 2xx, /openapi.json accepts."""
    response = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    schema_ok = VALIDATORS[route].is_valid(body)
    if not schema_ok:
        assert 400 <= response.status_code < 500, (body, response.status_code)
    if response.status_code < 300:
        assert schema_ok, body


def test_openapi_schema_declares_the_strict_request_models() -> None:
    chat = VALIDATORS["/v1/chat/completions"]
    good = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert chat.is_valid(good)
    assert not chat.is_valid({**good, "bogus": 1})  # unknown fields are rejected, and declared so
    assert not chat.is_valid({**good, "temperature": 7})
    assert client.post("/v1/chat/completions", json=good).status_code == 200


ITEM = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning"]) | JSON},
    optional={
        "role": st.sampled_from(["user", "assistant", "developer", "tool"]) | JSON,
        "content": st.text(max_size=20)
        | st.lists(st.fixed_dictionaries({"type": st.just("input_text"), "text": JSON})),
        "call_id": st.text(max_size=8) | JSON,
        "name": NAME,
        "arguments": st.text(max_size=20) | JSON,
        "output": st.text(max_size=20) | JSON,
    },
)
FLAT_TOOL = st.fixed_dictionaries(
    {"type": st.just("function") | JSON, "name": NAME | JSON}, optional={"parameters": SCHEMA, "strict": JSON}
)
RESPONSES_VALUES = {
    "model": st.sampled_from(["fake", "nope"]) | JSON,
    "input": st.text(max_size=20) | st.lists(ITEM, max_size=3) | JSON,
    "tools": st.lists(FLAT_TOOL, max_size=3) | JSON,
    "tool_choice": st.sampled_from(["none", "auto", "required"])
    | st.fixed_dictionaries({"type": st.just("function"), "name": NAME})
    | JSON,
    "text": st.fixed_dictionaries({"format": RESPONSE_FORMAT | JSON}) | JSON,
}
RESPONSES_FIELDS = [
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "metadata",
    "user",
    "store",
    "include",
    "previous_response_id",
    "background",
    "reasoning",
    "truncation",
    "bogus",
]
RESPONSES_BODY = st.dictionaries(st.sampled_from(RESPONSES_FIELDS), JSON, max_size=8).flatmap(
    lambda extra: st.fixed_dictionaries({k: RESPONSES_VALUES.get(k, JSON) for k in extra})
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=RESPONSES_BODY)
def test_no_responses_body_gets_a_server_error(body: dict) -> None:
    response = client.post("/v1/responses", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
