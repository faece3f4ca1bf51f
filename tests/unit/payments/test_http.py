"""The mounted router: sign-in, balance, deposits, receipts, OpenAI-format errors (401/402/403)."""

import base64

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from solders.keypair import Keypair
from sqlalchemy import update

from cluster.openai_errors import error_response, install_border_errors
from payments.errors import InsufficientBalance
from payments.http import build_router
from payments.ledger.schema import api_keys
from payments.protocol import HoldRequest
from tests.fakes.payments import LocalPaymentsClient
from tests.unit.payments.conftest import deposit_tx, funded_client, run, serve_request


@pytest.fixture
def service(make_service):  # type: ignore[no-untyped-def]
    return make_service()


@pytest.fixture
def http(service) -> TestClient:  # type: ignore[no-untyped-def]
    app = FastAPI()
    client = LocalPaymentsClient(service)
    install_border_errors(app)
    app.include_router(build_router(lambda: client))
    return TestClient(app)


def sign_in(http: TestClient, wallet: Keypair) -> str:
    challenge = http.post("/v1/auth/challenge", json={"wallet": str(wallet.pubkey())}).json()
    signature = str(wallet.sign_message(challenge["message"].encode()))
    response = http.post("/v1/auth/verify", json={"message": challenge["message"], "signature": signature})
    assert response.status_code == 200, response.text
    return response.json()["api_key"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_sign_in_deposit_and_balance(http: TestClient, service) -> None:  # type: ignore[no-untyped-def]
    wallet = Keypair()
    key = sign_in(http, wallet)
    run(service.faucet(str(wallet.pubkey()), 70_000))
    tx = base64.b64encode(bytes(deposit_tx(service, wallet, 70_000))).decode()
    deposit = http.post("/v1/deposits", json={"transaction": tx}, headers=auth(key))
    assert deposit.status_code == 200, deposit.text
    again = http.post("/v1/deposits", json={"signature": deposit.json()["signature"]}, headers=auth(key))
    assert again.json()["newly_credited"] is False
    balance = http.get("/v1/balance", headers=auth(key)).json()
    assert (balance["wallet"], balance["available"]) == (str(wallet.pubkey()), 70_000)


def test_forged_and_replayed_sign_ins_get_401(http: TestClient) -> None:
    wallet, attacker = Keypair(), Keypair()
    challenge = http.post("/v1/auth/challenge", json={"wallet": str(wallet.pubkey())}).json()
    forged = str(attacker.sign_message(challenge["message"].encode()))
    response = http.post("/v1/auth/verify", json={"message": challenge["message"], "signature": forged})
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    good = str(wallet.sign_message(challenge["message"].encode()))
    assert http.post("/v1/auth/verify", json={"message": challenge["message"], "signature": good}).status_code == 200
    replay = http.post("/v1/auth/verify", json={"message": challenge["message"], "signature": good})
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "invalid_nonce"
    assert http.get("/v1/balance").status_code == 401
    assert http.get("/v1/balance", headers=auth("slm_bogus")).status_code == 401


def test_receipt_readable_by_payer_and_provider_only(http: TestClient, service) -> None:  # type: ignore[no-untyped-def]
    payer, provider, stranger = funded_client(service, 100_000), Keypair(), Keypair()
    keys = {name: sign_in(http, kp) for name, kp in (("payer", payer), ("provider", provider), ("stranger", stranger))}
    record = serve_request(service, "r1", str(payer.pubkey()), [(str(provider.pubkey()), 30)])
    url = f"/v1/receipts/{record.settlement_id}"
    mine = http.get(url, headers=auth(keys["payer"]))
    assert mine.status_code == 200 and mine.json()["settled"] is False
    assert http.get(url, headers=auth(keys["provider"])).status_code == 200
    denied = http.get(url, headers=auth(keys["stranger"]))
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
    assert http.get("/v1/receipts/set_missing", headers=auth(keys["payer"])).status_code == 404
    run(service.settle())
    settled = http.get(url, headers=auth(keys["payer"])).json()
    assert settled["settled"] is True and len(settled["signatures"]) == 1


def test_revoked_key_gets_401(http: TestClient) -> None:
    wallet = Keypair()
    key = sign_in(http, wallet)
    # a second key of the same wallet, revoked with the first
    challenge = http.post("/v1/auth/challenge", json={"wallet": str(wallet.pubkey())}).json()
    signature = str(wallet.sign_message(challenge["message"].encode()))
    issued = http.post("/v1/auth/verify", json={"message": challenge["message"], "signature": signature}).json()
    assert http.delete(f"/v1/auth/keys/{issued['id']}", headers=auth(key)).status_code == 200
    assert http.get("/v1/balance", headers=auth(issued["api_key"])).status_code == 401
    assert http.get("/v1/balance", headers=auth(key)).status_code == 200


def test_insufficient_balance_maps_to_402_openai_error(service) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InsufficientBalance) as info:
        service.place_hold(HoldRequest("r1", str(Keypair().pubkey()), "m", max_tokens=10))
    response = error_response(info.value)
    assert response.status_code == 402
    assert b'"type":"insufficient_quota"' in response.body


def test_open_mode_needs_no_key_and_charges_nothing(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service(section={"open_mode": True})
    app = FastAPI()
    client = LocalPaymentsClient(service)
    install_border_errors(app)
    app.include_router(build_router(lambda: client))
    http = TestClient(app)
    who = service.authenticate(None)
    record = serve_request(service, "r1", who.wallet, [(str(Keypair().pubkey()), 1)])
    assert record.cost == 0
    assert http.get(f"/v1/receipts/{record.settlement_id}").status_code == 200


def test_keys_expire_visibly_and_a_wallet_lists_only_its_own(http: TestClient, service) -> None:  # type: ignore[no-untyped-def]
    owner, other = Keypair(), Keypair()
    challenge = http.post("/v1/auth/challenge", json={"wallet": str(owner.pubkey())}).json()
    signature = str(owner.sign_message(challenge["message"].encode()))
    verified = http.post(
        "/v1/auth/verify", json={"message": challenge["message"], "signature": signature, "ttl_s": 60}
    ).json()
    assert verified["expires_at"] == pytest.approx(verified["created_at"] + 60)
    second, theirs = sign_in(http, owner), sign_in(http, other)
    listed = http.get("/v1/auth/keys", headers=auth(second))
    assert listed.status_code == 200, listed.text
    assert {k["id"] for k in listed.json()["data"]} == {verified["id"], service.authenticate(second).key_id}
    assert second not in listed.text and verified["api_key"] not in listed.text and theirs not in listed.text
    assert all(
        set(k) == {"object", "id", "wallet", "created_at", "expires_at", "revoked_at"} for k in listed.json()["data"]
    )
    assert http.get("/v1/auth/keys").status_code == 401
    with service.auth.engine.begin() as conn:  # the 60 s key's time has come
        conn.execute(update(api_keys).where(api_keys.c.id == verified["id"]).values(expires_at=0))
    expired = http.get("/v1/balance", headers=auth(verified["api_key"]))
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "expired_api_key"
    bad = http.post("/v1/auth/verify", json={"message": "x", "signature": "y", "ttl_s": 0})
    assert bad.status_code == 422
