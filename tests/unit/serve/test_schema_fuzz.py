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
    "ignore_eos",
]
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "wizard"]) | JSON, "content": st.text(max_size=30) | JSON}
)
VALUES = {"model": st.sampled_from(["fake", "nope"]) | JSON, "messages": st.lists(MESSAGE, max_size=3) | JSON}
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
