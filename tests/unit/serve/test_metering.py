"""Gateway metering over a fake payments API: 401, 402, settlement ids, holds released on failure."""

import json
from collections.abc import AsyncIterator

import openai
import pytest
from fastapi.testclient import TestClient

from payments.errors import AuthenticationFailed, InsufficientBalance
from payments.protocol import DepositInfo, Hold, HoldRequest, ReleaseHold, SettlementRecord, UsageReport, WalletIdentity
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.metering import Metering
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
