"""Attacks on the proxy backend through the gateway, in process: the response cache must not be an oracle
for another payer's prompt, and nothing the upstream says about itself may reach the client."""

import json
import logging

import httpx
import pytest
from fastapi.testclient import TestClient

from payments.errors import AuthenticationFailed
from payments.protocol import DepositInfo, Hold, HoldRequest, ReleaseHold, SettlementRecord, UsageReport, WalletIdentity
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.backend import InProcessBackend
from serve_apps.gateway.metering import Metering
from tests.unit.backends.test_proxy import Handler, openai_stream, proxy, sse

SECRET = "sk-live-0xDEADBEEF-internal-host-10.0.0.7"


class Payments:
    """API keys 'alice' and 'bob' are two payers; holds always fit."""

    async def authenticate(self, api_key: str | None) -> WalletIdentity:
        if api_key not in ("alice", "bob"):
            raise AuthenticationFailed("invalid API key")
        return WalletIdentity(f"wallet-{api_key}")

    async def place_hold(self, req: HoldRequest) -> Hold:
        return Hold(req.request_id, req.payer, 1, 1_000)

    async def report_usage(self, report: UsageReport) -> SettlementRecord:
        fields = (report.model, report.prompt_tokens, report.completion_tokens, 1, 1, 1, (), 0.0)
        return SettlementRecord("set_1", report.request_id, report.payer, *fields)

    async def release_hold(self, release: ReleaseHold) -> None:
        return None

    async def deposit_info(self) -> DepositInfo:
        return DepositInfo("treasury", None, 9, "hash", "litesvm")


def gateway_over(write_catalogue, handler: Handler, paid: bool = True, **options: object) -> TestClient:  # type: ignore[no-untyped-def]
    replica = proxy(write_catalogue, handler, **options)
    gateway = Gateway(
        InProcessBackend({"px": replica}),
        [ModelCard("px", "upstream", max_model_len=512, backend="proxy")],
        metering=Metering(Payments() if paid else None),
    )
    return TestClient(create_gateway_app(gateway))


def ask(http: TestClient, key: str, stream: bool = False) -> httpx.Response:
    body = {"model": "px", "messages": [{"role": "user", "content": "my diagnosis is ..."}], "temperature": 0}
    return http.post(
        "/v1/chat/completions",
        json={**body, "max_tokens": 5, "stream": stream},
        headers={"Authorization": f"Bearer {key}"},
    )


def test_a_cached_answer_is_never_served_to_another_payer(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, content=openai_stream("Paris", usage=(9, 1)))

    http = gateway_over(write_catalogue, handler, cache=True)
    assert ask(http, "alice").status_code == 200 and ask(http, "alice").status_code == 200
    assert len(calls) == 1  # alice's own repeat is a hit
    bob = ask(http, "bob")
    assert bob.status_code == 200 and bob.json()["choices"][0]["message"]["content"] == "Paris"
    assert len(calls) == 2, "bob's identical request was answered from alice's cache entry"
    ask(http, "bob")
    assert len(calls) == 2  # and bob's own repeat is a hit in his


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def err(message: str, **fields: str) -> str:
    return json.dumps({"error": {"message": message, **fields}})


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, f"<html>Traceback: db at {SECRET}</html>", (502, "upstream_error")),
        (500, err(f"internal: {SECRET}", code="server_error"), (502, "upstream_error")),
        (401, err(f"Incorrect API key provided: {SECRET}"), (502, "upstream_error")),
        (403, err(f"org {SECRET} is suspended"), (502, "upstream_error")),
        (400, err(f"bad stop for {SECRET}", param="stop", code="invalid_value"), (400, "invalid_value")),
        (404, err(f"model {SECRET} not found", code="model_not_found"), (404, "model_not_found")),
        (429, err(f"tier of {SECRET}: 3 rpm", code="rate_limit_exceeded"), (429, "rate_limit_exceeded")),
        (503, f"overloaded ({SECRET})", (503, "upstream_unavailable")),
        (418, f"teapot {SECRET}", (502, "upstream_error")),
        (400, err("x", code=f"c {SECRET}", param=f"p {SECRET}"), (400, "upstream_rejected")),
    ],
)
def test_upstream_error_text_never_reaches_the_client(write_catalogue, caplog, status, body, expected) -> None:  # type: ignore[no-untyped-def]
    http = gateway_over(write_catalogue, lambda _: httpx.Response(status, content=body.encode()))
    with caplog.at_level(logging.WARNING, logger="serve_apps.backends.proxy.server"):
        response = ask(http, "alice")
    assert SECRET not in response.text and "DEADBEEF" not in response.text
    error = error_of(response)
    assert (response.status_code, error["code"]) == expected
    assert error["message"].startswith("the upstream provider")
    assert SECRET in caplog.text  # the operator still sees what the upstream said, server-side


def test_anthropic_error_text_never_reaches_the_client(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": f"busy: {SECRET}"}})
    http = gateway_over(write_catalogue, lambda _: httpx.Response(529, content=body.encode()), api="anthropic")
    response = ask(http, "alice")
    assert SECRET not in response.text and (response.status_code, error_of(response)["code"]) == (
        503,
        "upstream_unavailable",
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_mid_stream_upstream_error_is_ours_too(write_catalogue, stream: bool) -> None:  # type: ignore[no-untyped-def]
    content = sse({"choices": [{"delta": {"content": "Pa"}}]}, {"error": {"message": f"replica {SECRET} lost"}})
    http = gateway_over(write_catalogue, lambda _: httpx.Response(200, content=content))
    response = ask(http, "alice", stream=stream)
    assert SECRET not in response.text and "the upstream provider failed" in response.text
