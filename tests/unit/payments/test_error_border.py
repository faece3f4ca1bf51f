"""The payments routes inside the gateway's app: a PaymentError leaves through the gateway's one error handler,
with the type of its status from the one table (a 401 is an authentication_error there as everywhere)."""

from collections.abc import AsyncIterator

from fastapi.testclient import TestClient
from solders.keypair import Keypair

from cluster.openai_errors import ERROR_TYPES
from payments.errors import AuthenticationFailed, Forbidden, InsufficientBalance, NotFound, PaymentError
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.errors import OpenAIError
from serve_apps.gateway.metering import Metering
from tests.fakes.payments import LocalPaymentsClient
from tests.unit.payments.test_http import auth, sign_in


class _NoModels:
    def models(self) -> list[str]:
        return ["m"]

    async def stream(self, request: object) -> AsyncIterator[object]:
        raise AssertionError("no generation in these tests")
        yield


def test_payments_errors_leave_through_the_gateway_handler(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    gateway = Gateway(_NoModels(), [ModelCard("m", "t")], metering=Metering(LocalPaymentsClient(service)))
    http = TestClient(create_gateway_app(gateway))
    missing = http.get("/v1/balance")
    assert missing.status_code == 401
    assert missing.json()["error"] == {
        "message": missing.json()["error"]["message"],
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    key = sign_in(http, Keypair())
    absent = http.get("/v1/receipts/set_missing", headers=auth(key))
    assert absent.status_code == 404 and absent.json()["error"]["type"] == "not_found_error"
    bad = http.post("/v1/deposits", json={"transaction": "not base64!"}, headers=auth(key))
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_one_table_gives_payments_and_gateway_errors_the_same_type() -> None:
    for error in (AuthenticationFailed("x"), Forbidden("x"), NotFound("x"), InsufficientBalance("x")):
        assert error.error_type == OpenAIError(error.status_code, "x").error_type == ERROR_TYPES[error.status_code]
    assert PaymentError("x").error_type == "api_error"
