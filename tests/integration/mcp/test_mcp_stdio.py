"""`solanalm mcp` over stdio (spawned by the `mcp` client library) against the paid gateway: it uses the
API key it is given, so a tool's inference is charged to that wallet; resources come from the gateway."""

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

from tests.integration.attacks.conftest import MODEL, PaidApp, Wallet

REPO = Path(__file__).resolve().parents[3]


def _server(paid: PaidApp, api_key: str) -> StdioServerParameters:
    solanalm = str(Path(sys.executable).with_name("solanalm"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "SOLANALM_API_KEY": api_key}
    return StdioServerParameters(command=solanalm, args=["mcp", "--url", paid.base_url], env=env, cwd=str(REPO))


async def _use(paid: PaidApp, wallet: Wallet) -> dict[str, Any]:
    async with Client(_server(paid, wallet.api_key), read_timeout_seconds=300) as client:
        models = json.loads((await client.read_resource("llm://models")).contents[0].text)
        messages = [{"role": "user", "content": "Hello"}]
        args = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
        answer = await client.call_tool("llm_inference_distributed", args)
        bad = await client.call_tool("llm_inference_distributed", {"model": MODEL, "messages": [{"role": "x"}]})
        return {"models": models, "answer": answer, "bad": bad}


def test_stdio_server_answers_with_the_given_key_and_charges_its_wallet(paid: PaidApp) -> None:
    wallet = paid.wallet()
    before = paid.balance(wallet)
    seen = asyncio.run(_use(paid, wallet))
    after = paid.balance(wallet)
    assert [m["id"] for m in seen["models"]["data"]] == [MODEL]
    assert not seen["answer"].is_error, seen["answer"].content[0].text
    usage = seen["answer"].structured_content["usage"]
    assert before["available"] - after["available"] == usage["prompt_tokens"] * 1_000 + 4 * 2_000
    assert seen["bad"].is_error and "role" in seen["bad"].content[0].text


def test_stdio_server_with_a_wrong_key_reports_401_as_a_tool_error(paid: PaidApp) -> None:
    async def call() -> Any:
        async with Client(_server(paid, "sk-wrong"), read_timeout_seconds=120) as client:
            return await client.call_tool("llm_inference_distributed", {"model": MODEL, "prompt": "Hi"})

    result = asyncio.run(call())
    assert result.is_error and "(HTTP 401)" in result.content[0].text, result.content[0].text
