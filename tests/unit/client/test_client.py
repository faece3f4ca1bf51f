"""The sync and async SDK against a scripted gateway: sign-in, typed results, settlement ids, errors, retries."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from solanalm_client import (
    AsyncSolanaLMClient,
    AuthenticationError,
    InsufficientBalance,
    NotFound,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
    SolanaLMClient,
    SolanaLMError,
)
from solders.keypair import Keypair

from tests.unit.client.fake_gateway import KEY, SETTLEMENT, FakeGateway, error

FAST = RetryPolicy(attempts=3, initial_wait_s=0.0, max_wait_s=0.01)
URL = "http://gateway.test/v1"


def client_of(gateway: FakeGateway, **kwargs) -> SolanaLMClient:  # type: ignore[no-untyped-def]
    return SolanaLMClient(URL, transport=gateway.transport(), retry=FAST, **kwargs)


def test_sign_in_with_a_keypair_signs_the_challenge_and_uses_the_key() -> None:
    gateway, keypair = FakeGateway(), Keypair()
    with client_of(gateway) as client:
        key = client.sign_in(keypair)
        assert (key.wallet, key.secret, client.wallet) == (str(keypair.pubkey()), KEY, str(keypair.pubkey()))
        balance = client.balance()
    assert (balance.available, balance.unpaid_earnings, balance.asset) == (900, 40, "SOL")


def test_sync_inference_returns_the_answer_and_its_settlement_id() -> None:
    gateway = FakeGateway()
    with client_of(gateway, api_key=KEY) as client:
        answer = client.inference("Hi", max_tokens=2)
    assert (answer.text, answer.settlement_id, answer.request_id, answer.model) == (
        "Hello",
        SETTLEMENT,
        "req-1",
        "tiny",
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 2
    assert "GET /v1/models" in gateway.calls  # no model given: the first served one


def test_a_stream_yields_deltas_and_the_final_chunks_settlement_id() -> None:
    with client_of(FakeGateway(), api_key=KEY, model="tiny") as client:
        stream = client.stream("Hi")
        assert list(stream) == ["Hel", "lo"]
        result = stream.result
    assert (result.text, result.settlement_id, result.finish_reason, result.request_id) == (
        "Hello",
        SETTLEMENT,
        "length",
        "req-s",
    )
    assert result.usage is not None and result.usage.prompt_tokens == 3


def test_async_client_inference_stream_keys_and_earnings() -> None:
    async def scenario() -> None:
        gateway = FakeGateway()
        async with AsyncSolanaLMClient(URL, transport=gateway.transport(), retry=FAST) as client:
            await client.sign_in(Keypair())
            answer = await client.inference(messages=[{"role": "user", "content": "Hi"}])
            assert answer.settlement_id == SETTLEMENT
            stream = await client.stream("Hi")
            assert [t async for t in stream] == ["Hel", "lo"]
            assert (await stream.result()).settlement_id == SETTLEMENT
            keys = await client.list_keys()
            assert keys[0].id == "key_a" and keys[0].active and keys[0].expires_at == 9.0
            earnings = await client.earnings()
            assert (earnings.unpaid, earnings.in_flight, earnings.paid) == (40, 5, 70)

    asyncio.run(scenario())


def test_an_unfunded_wallet_gets_insufficient_balance_with_the_openai_fields() -> None:
    gateway = FakeGateway(
        fail={
            "POST /v1/chat/completions": [error(402, "balance 0 does not cover the hold 700", "insufficient_balance")]
        }
    )
    with client_of(gateway, api_key=KEY, model="tiny") as client, pytest.raises(InsufficientBalance) as caught:
        client.inference("Hi")
    assert (caught.value.status, caught.value.code) == (402, "insufficient_balance")
    assert "does not cover" in caught.value.message
    assert gateway.calls.count("POST /v1/chat/completions") == 1  # not retried


def test_status_codes_map_to_their_exceptions() -> None:
    gateway = FakeGateway(fail={"GET /v1/receipts/set_x": [error(404, "no settlement set_x", "not_found")]})
    with client_of(gateway, api_key="slm_wrong") as client, pytest.raises(AuthenticationError):
        client.balance()
    with client_of(gateway, api_key=KEY) as client, pytest.raises(NotFound) as caught:
        client.receipt("set_x")
    assert caught.value.code == "not_found"
    with client_of(gateway) as client, pytest.raises(SolanaLMError, match="sign in first"):
        client.balance()


def test_idempotent_calls_retry_429_and_503_honouring_retry_after() -> None:
    waits = [error(429, "slow down", "rate_limit_exceeded", {"Retry-After": "0"}), error(503, "starting", "starting")]
    gateway = FakeGateway(fail={"GET /v1/balance": waits})
    with client_of(gateway, api_key=KEY) as client:
        assert client.balance().available == 900
    assert gateway.calls.count("GET /v1/balance") == 3


def test_retries_stop_after_the_policys_attempts_with_the_last_error() -> None:
    busy = [error(429, "slow down", "rate_limit_exceeded", {"Retry-After": "0"}) for _ in range(5)]
    gateway = FakeGateway(fail={"GET /v1/balance": busy})
    with client_of(gateway, api_key=KEY) as client, pytest.raises(RateLimited) as caught:
        client.balance()
    assert caught.value.retry_after_s == 0.0 and gateway.calls.count("GET /v1/balance") == 3


def test_a_completion_is_not_retried_on_503_but_is_on_429() -> None:
    gateway = FakeGateway(fail={"POST /v1/chat/completions": [error(503, "pipeline lost", "pipeline_unavailable")]})
    with client_of(gateway, api_key=KEY, model="tiny") as client, pytest.raises(ServiceUnavailable):
        client.inference("Hi")
    assert gateway.calls.count("POST /v1/chat/completions") == 1
    limited = FakeGateway(
        fail={"POST /v1/chat/completions": [error(429, "later", "rate_limit_exceeded", {"Retry-After": "0"})]}
    )
    with client_of(limited, api_key=KEY, model="tiny") as client:
        assert client.inference("Hi").settlement_id == SETTLEMENT
    assert limited.calls.count("POST /v1/chat/completions") == 2


def test_a_validation_error_body_becomes_a_clear_message() -> None:
    detail = httpx.Response(422, json={"detail": [{"loc": ["body", "max_tokens"], "msg": "too large"}]})
    gateway = FakeGateway(fail={"POST /v1/chat/completions": [detail]})
    with client_of(gateway, api_key=KEY, model="tiny") as client, pytest.raises(SolanaLMError) as caught:
        client.inference("Hi", max_tokens=10**9)
    assert caught.value.status == 422 and "too large" in caught.value.message


def test_an_unreachable_gateway_is_a_connection_error_not_a_traceback() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with SolanaLMClient(URL, KEY, transport=httpx.MockTransport(refuse), retry=FAST) as client:
        with pytest.raises(SolanaLMError, match="cannot reach"):
            client.balance()
        with pytest.raises(SolanaLMError, match="cannot reach"):
            client.inference("Hi", model="tiny")


def test_bad_arguments_are_refused_before_any_request() -> None:
    gateway = FakeGateway()
    with pytest.raises(SolanaLMError, match="http://"):
        SolanaLMClient("gateway.test:8000")
    with client_of(gateway, api_key=KEY) as client:
        with pytest.raises(SolanaLMError, match="exactly one"):
            client.inference()
        with pytest.raises(SolanaLMError, match="without '/'"):
            client.receipt("../balance")
        with pytest.raises(SolanaLMError, match="keypair"):
            client.deposit(10)
    assert gateway.calls == []


def test_payouts_and_provider_status_are_typed() -> None:
    nodes = {
        "object": "list",
        "data": [
            {"node_id": "provider-1", "wallet": "W1", "kind": "provider", "health": "alive", "models": ["tiny"]},
            {"node_id": "ray-2", "wallet": "W2", "kind": "ray", "health": "dead"},
        ],
    }
    gateway = FakeGateway(fail={"GET /v1/network/nodes": [httpx.Response(200, json=nodes)]})
    with client_of(gateway, api_key=KEY) as client:
        status = client.provider_status("W1")
        lines = client.payouts()
    assert status.registered and status.alive and status.nodes[0].models == ("tiny",)
    assert [p.confirmed for p in lines] == [True, False]


def test_cli_prints_one_line_for_a_bad_keypair_and_json_otherwise(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from solanalm_client import cli

    bad = tmp_path / "id.json"
    bad.write_text("[1, 2, 3]")
    assert cli.run(["--url", URL, "--keypair", str(bad), "balance"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Solana CLI keypair" in err and "Traceback" not in err
    assert cli.run(["--url", URL, "--keypair", str(tmp_path / "missing.json"), "balance"]) == 2
    assert "no keypair file" in capsys.readouterr().err

    gateway = FakeGateway()
    monkeypatch.setattr(
        cli, "SolanaLMClient", lambda url, key: SolanaLMClient(url, key, transport=gateway.transport(), retry=FAST)
    )
    good = tmp_path / "good.json"
    good.write_text(json.dumps(list(bytes(Keypair()))))
    assert cli.run(["--url", URL, "--keypair", str(good), "chat", "Hi", "--model", "tiny"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["settlement_id"] == SETTLEMENT and printed["text"] == "Hello"
