"""MCP over streamable HTTP at /mcp on a paid gateway, with the `mcp` client library: refused without a
key, answers and charges with one, lists its resources, and a bad argument is a clear MCP error."""

import asyncio
import json
from typing import Any

import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.integration.attacks.conftest import MODEL, PaidApp, Wallet

RESOURCES = {
    "llm://models",
    "llm://nodes",
    "llm://performance",
    "training://jobs",
    "training://data_shards",
    "training://checkpoints",
    "training://metrics",
}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}


def mcp_url(paid: PaidApp) -> str:
    return paid.base_url.removesuffix("/v1") + "/mcp"


def _client(paid: PaidApp, wallet: Wallet | None) -> Client:
    headers = wallet.headers if wallet else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(120, read=300))
    return Client(streamable_http_client(mcp_url(paid), http_client=http), read_timeout_seconds=300)


def test_without_a_key_mcp_is_refused_with_401(paid: PaidApp) -> None:
    headers = {"Accept": "application/json, text/event-stream"}
    for auth in ({}, {"Authorization": "Bearer sk-not-a-key"}):
        response = httpx.post(mcp_url(paid), json=INITIALIZE, headers={**headers, **auth}, timeout=30)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["message"]


async def _session(paid: PaidApp, wallet: Wallet) -> dict[str, Any]:
    async with _client(paid, wallet) as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        models = json.loads((await client.read_resource("llm://models")).contents[0].text)
        performance = json.loads((await client.read_resource("llm://performance")).contents[0].text)
        args = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0}
        answer = await client.call_tool("llm_inference_distributed", args)
        bad = await client.call_tool("llm_inference_distributed", {"model": MODEL, "prompt": "x", "max_tokens": -1})
        unknown = await client.call_tool("llm_inference_distributed", {"model": "no-such-model", "prompt": "x"})
        both = await client.call_tool("llm_inference_distributed", {"model": MODEL})
        return {"tools": tools, "resources": resources, "models": models, "performance": performance,
                "answer": answer, "bad": bad, "unknown": unknown, "both": both}  # fmt: skip


def test_with_a_key_inference_answers_and_is_charged_like_any_request(paid: PaidApp) -> None:
    wallet = paid.wallet()
    before = paid.balance(wallet)
    seen = asyncio.run(_session(paid, wallet))
    after = paid.balance(wallet)

    assert {"llm_inference_distributed", "llm_train_distributed", "llm_data_shard"} <= seen["tools"]
    assert seen["resources"] == RESOURCES
    assert [m["id"] for m in seen["models"]["data"]] == [MODEL]
    assert seen["performance"]["pipelines"][0]["status"] == "ok"

    answer = seen["answer"]
    assert not answer.is_error, answer.content[0].text
    result = answer.structured_content
    assert result["usage"]["completion_tokens"] == 5 and result["settlement_id"]
    charged = before["available"] - after["available"]
    assert charged == result["usage"]["prompt_tokens"] * 1_000 + 5 * 2_000 and after["held"] == 0
    receipt = httpx.get(f"{paid.base_url}/receipts/{result['settlement_id']}", headers=wallet.headers, timeout=30)
    assert receipt.status_code == 200 and receipt.json()["payer"] == wallet.address, receipt.text

    for name, needle in (("bad", "max_tokens"), ("unknown", "no-such-model"), ("both", "exactly one")):
        text = seen[name].content[0].text
        assert seen[name].is_error and needle in text and "Traceback" not in text, (name, text)


def test_an_unfunded_wallet_gets_a_clear_tool_error(paid: PaidApp) -> None:
    wallet = paid.wallet(deposit=0)

    async def call() -> Any:
        async with _client(paid, wallet) as client:
            return await client.call_tool("llm_inference_distributed", {"model": MODEL, "prompt": "Hi"})

    result = asyncio.run(call())
    assert result.is_error and "(HTTP 402)" in result.content[0].text, result.content[0].text
