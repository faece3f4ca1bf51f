"""Attacks on holds and settlement: abandoned streams and requests, holds larger than the output the
replica allows, orphaned holds, and input the payments path cannot encode (issue 18)."""

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from ray import serve
from sqlalchemy import create_engine, select

from payments.ledger.schema import holds, settlements
from payments.protocol import HoldRequest
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.backend import ServeHandleBackend
from serve_apps.gateway.metering import Metering
from tests.integration.attacks.conftest import MODEL, PaidApp, Wallet

PROMPT_PRICE, COMPLETION_PRICE = 1_000, 2_000  # per token, as the paid fixture prices tiny-llama
LONG = 300  # completion tokens asked for: far more than the client reads before it leaves


def ledger_row(paid: PaidApp, table: Any, request_id: str) -> Any:
    """One row of the payments actor's ledger (SQLite in its state_dir), read beside the actor."""
    engine = create_engine(paid.settings.payments.resolved_database_url())
    try:
        with engine.connect() as conn:
            return conn.execute(select(table).where(table.c.request_id == request_id)).first()
    finally:
        engine.dispose()


def closed_hold(paid: PaidApp, wallet: Wallet, request_id: str, deadline_s: float = 60.0) -> dict[str, Any]:
    """The wallet's balance once the request's hold is no longer open (settled or released)."""
    until = time.monotonic() + deadline_s
    while True:
        hold = ledger_row(paid, holds, request_id)
        if hold is not None and hold.state != "open":
            return paid.balance(wallet)
        if time.monotonic() > until:
            state = None if hold is None else hold.state
            raise AssertionError(f"the hold of {request_id} is still {state} after {deadline_s}s")
        time.sleep(0.2)


def stream_body(**extra: object) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "ignore_eos": True, **extra}


def test_an_abandoned_stream_is_charged_for_the_tokens_it_was_sent(paid: PaidApp) -> None:
    wallet = paid.wallet()
    before = paid.balance(wallet)
    chunks = 0
    with httpx.Client(timeout=60) as http:
        body = stream_body(stream=True, max_tokens=LONG)
        with http.stream("POST", paid.base_url + "/completions", json=body, headers=wallet.headers) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                request_id = chunk["id"]  # the gateway's request id (Serve adds its own to x-request-id)
                chunks += bool(chunk["choices"][0]["text"])
                if chunks == 60:
                    break  # leaving the block closes the connection mid-stream
    after = closed_hold(paid, wallet, request_id)
    assert after["held"] == 0
    record = ledger_row(paid, settlements, request_id)
    assert record is not None, "the abandoned stream was released, not charged"
    # Every chunk carried at least one token; the tokens never sent (the rest of LONG) are not charged.
    assert 60 <= record.completion_tokens < LONG
    cost = record.prompt_tokens * PROMPT_PRICE + record.completion_tokens * COMPLETION_PRICE
    assert record.cost == cost == before["available"] - after["available"]


def test_a_non_streamed_request_whose_client_leaves_pays_for_what_was_produced(paid: PaidApp) -> None:
    wallet = paid.wallet()
    before = paid.balance(wallet)
    with httpx.Client(timeout=httpx.Timeout(60, read=0.5)) as http, pytest.raises(httpx.ReadTimeout):
        http.post(paid.base_url + "/completions", json=stream_body(max_tokens=450), headers=wallet.headers)
    request_id = _latest_request_of(paid, wallet.address)  # the client never saw the answer's headers
    after = closed_hold(paid, wallet, request_id)
    assert after["held"] == 0
    record = ledger_row(paid, settlements, request_id)
    assert record is not None, "the abandoned request was released, not charged"
    assert 0 < record.completion_tokens < 450
    assert record.cost == before["available"] - after["available"] > 0


def _latest_request_of(paid: PaidApp, payer: str, deadline_s: float = 30.0) -> str:
    engine = create_engine(paid.settings.payments.resolved_database_url())
    until = time.monotonic() + deadline_s
    try:
        while True:
            with engine.connect() as conn:
                row = conn.execute(
                    select(holds.c.request_id).where(holds.c.payer == payer).order_by(holds.c.created_at.desc())
                ).first()
            if row is not None:
                return str(row.request_id)
            if time.monotonic() > until:
                raise AssertionError(f"no hold of {payer} after {deadline_s}s")
            time.sleep(0.2)
    finally:
        engine.dispose()


def test_a_request_without_max_tokens_is_billed_for_every_token_it_got(paid: PaidApp) -> None:
    """A gateway whose catalogue says 32 tokens of context over a replica that allows 512: the hold covers
    32 completion tokens, so the replica must stop there (before: it filled its own context, unbilled)."""
    handle = serve.get_deployment_handle(f"pipeline-{MODEL}", app_name=paid.settings.http.app_name)
    gateway = Gateway(
        ServeHandleBackend({MODEL: handle}),
        [ModelCard(MODEL, "solanalm", max_model_len=32)],
        metering=Metering(paid.payments()),
    )
    wallet = paid.wallet()
    before = paid.balance(wallet)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0}
    with TestClient(create_gateway_app(gateway)) as http:
        response = http.post("/v1/chat/completions", json={**body, "ignore_eos": True}, headers=wallet.headers)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    after = paid.balance(wallet)
    charged = before["available"] - after["available"]
    assert charged == usage["prompt_tokens"] * PROMPT_PRICE + usage["completion_tokens"] * COMPLETION_PRICE
    assert usage["completion_tokens"] <= 32 and after["held"] == 0


def test_an_orphaned_hold_is_swept_back_to_its_payer(paid: PaidApp) -> None:
    """A place_hold that committed after its caller timed out: no request will settle or release it."""
    wallet = paid.wallet()
    before = paid.balance(wallet)
    payments = paid.payments()
    hold = asyncio.run(payments.place_hold(HoldRequest(f"orphan-{uuid.uuid4().hex}", wallet.address, MODEL, 100, 10)))
    assert paid.balance(wallet)["held"] == hold.amount > 0
    time.sleep(1.5)
    swept = asyncio.run(payments.sweep_holds(1.0))
    assert hold.request_id in swept.request_ids
    after = paid.balance(wallet)
    assert (after["available"], after["held"]) == (before["available"], 0)
    assert asyncio.run(payments.reconcile()).checks["no_stale_holds"]


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
        ("/completions", '{"model": "%s", "prompt": "\\udfff", "max_tokens": 2}'),
        (
            "/chat/completions",
            '{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
        ),  # noqa: E501
    ],
)
def test_a_lone_surrogate_is_a_400_not_a_500(paid: PaidApp, path: str, raw: str) -> None:
    wallet = paid.wallet()
    headers = {**wallet.headers, "Content-Type": "application/json"}
    response = httpx.post(paid.base_url + path, content=(raw % MODEL).encode(), headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "surrogate" in error["message"]
    assert paid.balance(wallet)["held"] == 0
