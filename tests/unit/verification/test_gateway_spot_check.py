"""The gateway hands every answered request to the verifier (after settling, with the completion), never
a failed one; metering turns a verdict's culprits into a withheld payout (None: the operator's wallet)."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi.testclient import TestClient

from payments.protocol import DepositInfo, WithheldPayout, WithholdPayout
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.metering import Metering
from serve_apps.protocol import Accepted, Finished, GenerateRequest, PipelineInfo, TextDelta


class Backend:
    def models(self) -> list[str]:
        return ["m"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        yield Accepted(3)
        yield TextDelta("hel", 1)
        yield TextDelta("lo", 2)
        failed = "fail" in (request.prompt or "")
        yield Finished("error" if failed else "stop", 3, 2, error="boom" if failed else None, replica_id="replica-7")

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r", "n", "float32", 6, 64, ())


class RecordingVerifier:
    def __init__(self) -> None:
        self.submitted: list[tuple[str, str, str]] = []

    def submit(self, request: GenerateRequest, served_replica: str, completion: str) -> None:
        self.submitted.append((request.prompt or "", served_replica, completion))


def client(verifier: RecordingVerifier) -> TestClient:
    gateway = Gateway(Backend(), [ModelCard("m", "test")], verifier=verifier)  # type: ignore[arg-type]
    return TestClient(create_gateway_app(gateway))


def test_answered_requests_are_handed_to_the_verifier_streamed_or_not() -> None:
    verifier = RecordingVerifier()
    http = client(verifier)
    assert http.post("/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 2}).status_code == 200
    with http.stream("POST", "/v1/completions", json={"model": "m", "prompt": "b", "stream": True}) as response:
        assert response.status_code == 200 and "[DONE]" in response.read().decode()
    assert verifier.submitted == [("a", "replica-7", "hello"), ("b", "replica-7", "hello")]


def test_a_failed_request_is_not_verified() -> None:
    verifier = RecordingVerifier()
    assert client(verifier).post("/v1/completions", json={"model": "m", "prompt": "fail"}).status_code == 503
    assert verifier.submitted == []


class Payments:
    def __init__(self) -> None:
        self.withheld: list[WithholdPayout] = []

    async def deposit_info(self) -> DepositInfo:
        return DepositInfo("treasury-wallet", None, 9, "hash", "litesvm")

    async def withhold_payout(self, req: WithholdPayout) -> WithheldPayout:
        self.withheld.append(req)
        return WithheldPayout(req.request_id, "set_1", 10, req.wallets)


def test_metering_withholds_the_culprits_payout_and_maps_no_wallet_to_the_operator() -> None:
    payments: Any = Payments()
    result = asyncio.run(Metering(payments).withhold("cmpl-1", ["w-bad", None], "spot-check failed"))
    assert payments.withheld == [WithholdPayout("cmpl-1", ("treasury-wallet", "w-bad"), "spot-check failed")]
    assert result is not None and result.amount == 10
    assert asyncio.run(Metering(None).withhold("cmpl-1", ["w-bad"], "x")) is None  # payments off: nothing
