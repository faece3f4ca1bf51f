"""Gateway metering over a fake payments API: 401, 402, settlement ids, holds released on failure, and
requests whose client left charged for what they were sent, however their task was cancelled."""

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from payments.errors import AuthenticationFailed, InsufficientBalance
from payments.protocol import DepositInfo, Hold, HoldRequest, ReleaseHold, SettlementRecord, UsageReport, WalletIdentity
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.metering import HoldCloser, Metering
from serve_apps.protocol import Accepted, Finished, GenerateRequest, PipelineInfo, ProviderWork, TextDelta


class Backend:
    def models(self) -> list[str]:
        return ["m"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        yield Accepted(3)
        yield TextDelta("ok", 1)
        failed = "fail" in (request.prompt or "")
        yield Finished(
            "error" if failed else "stop",
            3,
            1,
            error="boom" if failed else None,
            providers=(ProviderWork("provider-a", 4), ProviderWork(None, 2)),
        )

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r", "n", "float32", 6, 64, ())


class FakePayments:
    """Keys map to wallets; 'poor' has no balance. Records every hold, report and release."""

    def __init__(self) -> None:
        self.holds: list[HoldRequest] = []
        self.reports: list[UsageReport] = []
        self.released: list[str] = []

    async def authenticate(self, api_key: str | None) -> WalletIdentity:
        if api_key not in ("rich", "poor"):
            raise AuthenticationFailed("invalid API key")
        return WalletIdentity(f"wallet-{api_key}")

    async def place_hold(self, req: HoldRequest) -> Hold:
        if req.payer == "wallet-poor":
            raise InsufficientBalance("balance 0 does not cover 12")
        self.holds.append(req)
        return Hold(req.request_id, req.payer, 12, 88)

    async def report_usage(self, report: UsageReport) -> SettlementRecord:
        self.reports.append(report)
        return SettlementRecord(
            f"set_{len(self.reports)}",
            report.request_id,
            report.payer,
            report.model,
            report.prompt_tokens,
            report.completion_tokens,
            1,
            1,
            1,
            (),
            0.0,
        )

    async def release_hold(self, release: ReleaseHold) -> None:
        self.released.append(release.request_id)

    async def deposit_info(self) -> DepositInfo:
        return DepositInfo("treasury", None, 9, "hash", "litesvm")


@pytest.fixture()
def payments() -> FakePayments:
    return FakePayments()


@pytest.fixture()
def http(payments: FakePayments) -> TestClient:
    gateway = Gateway(Backend(), [ModelCard("m", "t", max_model_len=64)], metering=Metering(payments))
    return TestClient(create_gateway_app(gateway))


def test_missing_or_bad_key_is_401(http: TestClient) -> None:
    response = http.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_short_balance_is_402_before_any_generation(http: TestClient, payments: FakePayments) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="poor", http_client=http, max_retries=0)
    with pytest.raises(openai.APIStatusError) as error:
        client.completions.create(model="m", prompt="x", max_tokens=5)
    assert error.value.status_code == 402 and not payments.reports


def test_completed_request_is_settled_with_provider_layers(http: TestClient, payments: FakePayments) -> None:
    response = http.post(
        "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 5}, headers={"Authorization": "Bearer rich"}
    )
    assert response.status_code == 200
    assert response.headers["x-solanalm-settlement-id"] == response.json()["settlement_id"] == "set_1"
    hold, report = payments.holds[0], payments.reports[0]
    assert hold.max_tokens == 5 and hold.prompt_tokens >= 3  # an upper bound of the prompt
    assert [(p.wallet, p.layers_served) for p in report.providers] == [("provider-a", 4), ("treasury", 2)]
    assert (report.payer, report.prompt_tokens, report.completion_tokens) == ("wallet-rich", 3, 1)


def test_hold_without_max_tokens_covers_the_context(http: TestClient, payments: FakePayments) -> None:
    http.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": "Bearer rich"},
    )
    assert payments.holds[0].max_tokens == 64


def test_failed_generation_is_not_charged(http: TestClient, payments: FakePayments) -> None:
    response = http.post(
        "/v1/completions", json={"model": "m", "prompt": "fail"}, headers={"Authorization": "Bearer rich"}
    )
    assert response.status_code == 503 and not payments.reports
    assert payments.released == [payments.holds[0].request_id]


def test_stream_carries_the_settlement_id_in_its_final_chunk(http: TestClient, payments: FakePayments) -> None:
    body = {"model": "m", "prompt": "x", "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"Authorization": "Bearer rich"}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["settlement_id"] == "set_1" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not payments.released


def test_payments_routes_answer_503_when_payments_are_off() -> None:
    http = TestClient(create_gateway_app(Gateway(Backend(), [ModelCard("m", "t")])))
    assert http.get("/v1/balance").status_code == 503


class SlowBackend:
    """Accepted with its payees, then one token per delta; waits `pause_s` before each delta after the
    `fast`-th (a client can leave while it waits). 'fail' in the prompt: the pipeline fails after `fast`."""

    def __init__(self, tokens: int = 10, fast: int = 3, pause_s: float = 30.0) -> None:
        self.tokens, self.fast, self.pause_s = tokens, fast, pause_s
        self.requests: list[GenerateRequest] = []

    def models(self) -> list[str]:
        return ["m"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        self.requests.append(request)
        yield Accepted(3, providers=(ProviderWork("provider-a", 4), ProviderWork(None, 2)))
        for count in range(1, self.tokens + 1):
            if count > self.fast:
                if "fail" in (request.prompt or ""):
                    yield Finished("error", 3, count - 1, error="boom")
                    return
                await asyncio.sleep(self.pause_s)
            yield TextDelta(f"t{count}", count)
        yield Finished("length", 3, self.tokens, providers=(ProviderWork("provider-a", 4), ProviderWork(None, 2)))

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r", "n", "float32", 6, 64, ())


def slow_gateway(payments: FakePayments, **backend: Any) -> tuple[Gateway, SlowBackend]:
    fake = SlowBackend(**backend)
    return Gateway(fake, [ModelCard("m", "t", max_model_len=64)], metering=Metering(payments)), fake


async def admitted(gateway: Gateway, prompt: str = "x", stream: bool = True) -> tuple[GenerateRequest, HoldCloser]:
    from serve_apps.gateway.openai_protocol import CompletionRequest

    body = CompletionRequest(model="m", prompt=prompt, max_tokens=10, stream=stream)
    request = gateway.to_generate_request(body)
    identity = await gateway.metering.authenticate("Bearer rich")
    payer = await gateway.metering.admit(identity, request, gateway.hold_tokens(body))
    return request, gateway.metering.closer(request, payer)


def test_a_stream_closed_by_its_client_pays_for_the_tokens_it_was_sent(payments: FakePayments) -> None:
    async def scenario() -> None:
        gateway, _ = slow_gateway(payments)
        request, hold = await admitted(gateway)
        accepted, events = await gateway.open_stream(request)
        stream = gateway.sse_events(request, events, accepted, False, False, hold)
        chunks = [await anext(stream) for _ in range(2)]
        await stream.aclose()  # the server closes the generator of a client that went away
        await gateway.metering.drain()
        assert len(chunks) == 2 and hold.closed

    asyncio.run(scenario())
    (report,) = payments.reports
    assert (report.prompt_tokens, report.completion_tokens) == (3, 2) and not payments.released
    assert [(p.wallet, p.layers_served) for p in report.providers] == [("provider-a", 4), ("treasury", 2)]


def test_a_cancelled_stream_is_settled_even_though_its_task_is_cancelled_again(payments: FakePayments) -> None:
    """The route's task is cancelled while it waits for the next token, and cancelled again while it cleans up:
    the settlement runs in a task of its own and completes all the same."""

    async def scenario() -> None:
        gateway, _ = slow_gateway(payments)
        request, hold = await admitted(gateway)
        accepted, events = await gateway.open_stream(request)
        stream = gateway.sse_events(request, events, accepted, False, False, hold)

        async def client() -> None:
            async for _ in stream:
                pass

        task = asyncio.create_task(client())
        await asyncio.sleep(0.05)  # three tokens sent, the fourth is slow
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gateway.metering.drain()

    asyncio.run(scenario())
    assert [(r.completion_tokens, r.prompt_tokens) for r in payments.reports] == [(3, 3)] and not payments.released


def test_a_settlement_under_way_survives_the_client_leaving(payments: FakePayments) -> None:
    async def slow_report(report: UsageReport) -> SettlementRecord:
        await asyncio.sleep(0.05)
        return await FakePayments.report_usage(payments, report)

    payments.report_usage = slow_report  # type: ignore[method-assign]

    async def scenario() -> None:
        gateway, _ = slow_gateway(payments, tokens=3)
        request, hold = await admitted(gateway)
        accepted, events = await gateway.open_stream(request)
        stream = gateway.sse_events(request, events, accepted, False, False, hold)

        async def client() -> None:
            async for _ in stream:
                pass

        task = asyncio.create_task(client())
        while not hold.closed:  # every token sent, the settlement started
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await gateway.metering.drain()

    asyncio.run(scenario())
    assert [r.completion_tokens for r in payments.reports] == [3] and not payments.released


def test_a_pipeline_failure_mid_stream_is_released_not_charged(payments: FakePayments) -> None:
    async def scenario() -> list[str]:
        gateway, _ = slow_gateway(payments)
        request, hold = await admitted(gateway, prompt="fail")
        accepted, events = await gateway.open_stream(request)
        chunks = [c async for c in gateway.sse_events(request, events, accepted, False, False, hold)]
        await gateway.metering.drain()
        return chunks

    chunks = asyncio.run(scenario())
    assert '"code":"pipeline_unavailable"' in chunks[-2] and chunks[-1] == "data: [DONE]\n\n"
    assert not payments.reports and len(payments.released) == 1


def test_a_stream_past_the_request_timeout_ends_and_pays_for_what_it_was_sent(payments: FakePayments) -> None:
    async def scenario() -> list[str]:
        gateway, _ = slow_gateway(payments)
        gateway.request_timeout_s = 0.2
        request, hold = await admitted(gateway)
        accepted, events = await gateway.open_stream(request)
        chunks = [c async for c in gateway.sse_events(request, events, accepted, False, False, hold)]
        await gateway.metering.drain()
        return chunks

    chunks = asyncio.run(scenario())
    assert '"code":"timeout"' in chunks[-2] and chunks[-1] == "data: [DONE]\n\n"
    assert [r.completion_tokens for r in payments.reports] == [3] and not payments.released


def test_a_non_streamed_request_whose_client_leaves_pays_for_what_was_produced(payments: FakePayments) -> None:
    async def scenario() -> None:
        gateway, _ = slow_gateway(payments)
        request, hold = await admitted(gateway, stream=False)
        task = asyncio.create_task(gateway.complete(request, False, hold))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        hold.release("failed")  # what the route does next: nothing, the hold is closed
        await gateway.metering.drain()

    asyncio.run(scenario())
    assert [r.completion_tokens for r in payments.reports] == [3] and not payments.released


def test_without_max_tokens_the_replica_is_capped_at_the_hold(payments: FakePayments) -> None:
    gateway, fake = slow_gateway(payments, tokens=1)
    http = TestClient(create_gateway_app(gateway))
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer rich"})
    request = fake.requests[0]
    assert payments.holds[0].max_tokens == request.max_tokens_cap == 64 and not request.max_tokens_given
    assert request.completion_budget(500) == 64 and request.completion_budget(20) == 20
    http.post("/v1/chat/completions", json={**body, "max_tokens": 7}, headers={"Authorization": "Bearer rich"})
    assert fake.requests[1].max_tokens_cap is None and fake.requests[1].completion_budget(500) == 7


def test_the_settlement_runs_outside_the_request_context(payments: FakePayments) -> None:
    """Ray attributes an actor call to the context that makes it, and Serve cancels a cancelled request's calls:
    the settlement of a request whose client left must not be made from that request's context."""
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="fresh")
    seen: list[str] = []
    report_usage = payments.report_usage

    async def recording(report: UsageReport) -> SettlementRecord:
        seen.append(marker.get())
        return await report_usage(report)

    payments.report_usage = recording  # type: ignore[method-assign]

    async def scenario() -> None:
        gateway, _ = slow_gateway(payments, tokens=2)
        marker.set("the request's")
        request, hold = await admitted(gateway)
        accepted, events = await gateway.open_stream(request)
        assert len([c async for c in gateway.sse_events(request, events, accepted, False, False, hold)]) == 4
        await gateway.metering.drain()

    asyncio.run(scenario())
    assert seen == ["fresh"] and [r.completion_tokens for r in payments.reports] == [2]
