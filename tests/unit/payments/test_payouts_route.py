"""GET /v1/payouts: the caller's payout lines with their batch's state and transaction signature."""

from fastapi import FastAPI
from fastapi.testclient import TestClient
from solders.keypair import Keypair

from cluster.openai_errors import install_border_errors
from payments.http import build_router
from tests.fakes.payments import LocalPaymentsClient
from tests.unit.payments.conftest import funded_client, onchain_amount, run, serve_request
from tests.unit.payments.test_http import auth, sign_in


def test_a_provider_lists_its_confirmed_payout_and_others_see_none(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    app = FastAPI()
    client = LocalPaymentsClient(service)
    install_border_errors(app)
    app.include_router(build_router(lambda: client))
    http = TestClient(app)
    payer, provider = funded_client(service, 1_000_000), Keypair()
    keys = {"payer": sign_in(http, payer), "provider": sign_in(http, provider)}
    serve_request(service, "r1", str(payer.pubkey()), [(str(provider.pubkey()), 30)])
    before = http.get("/v1/payouts", headers=auth(keys["provider"]))
    assert before.status_code == 200 and before.json() == {"object": "list", "data": []}

    report = run(service.settle())
    assert report.payouts_confirmed == 1

    lines = http.get("/v1/payouts", headers=auth(keys["provider"])).json()["data"]
    assert len(lines) == 1
    line = lines[0]
    assert line["object"] == "payout" and line["wallet"] == str(provider.pubkey())
    assert line["state"] == "confirmed" and line["signature"]
    assert line["amount"] == onchain_amount(service, str(provider.pubkey())) > 0
    assert http.get("/v1/payouts", headers=auth(keys["payer"])).json()["data"] == []
    denied = http.get("/v1/payouts")
    assert denied.status_code == 401 and denied.json()["error"]["code"]
