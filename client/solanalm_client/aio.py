"""`AsyncSolanaLMClient`: the SDK with await (seed 000's shape).

async with AsyncSolanaLMClient("http://127.0.0.1:8000") as client:
    await client.sign_in("~/.config/solana/id.json")
    answer = await client.inference("Hello")
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import openai
from solders.keypair import Keypair
from tenacity import AsyncRetrying

from solanalm_client import api
from solanalm_client import models as M
from solanalm_client.errors import ConnectionFailed, SolanaLMError, error_from_response
from solanalm_client.oai import openai_errors
from solanalm_client.rpc import confirm_params, parse_rpc, send_params
from solanalm_client.wallet import as_keypair, deposit_transaction, sign_message

T = TypeVar("T")


class AsyncSolanaLMClient:
    """The same calls as `SolanaLMClient`, as coroutines (one httpx.AsyncClient per client)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 120.0,
        retry: api.RetryPolicy | None = None,
        model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`url`: the gateway (with or without /v1); `transport`: an httpx transport (proxies, tests)."""
        self.root = api.api_root(url)
        self.api_key = api_key
        self.keypair: Keypair | None = None
        self.wallet: str | None = None
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry or api.RetryPolicy()
        self._transport = transport
        self._http = httpx.AsyncClient(base_url=self.root, timeout=timeout_s, transport=transport)
        self._oa: tuple[str | None, openai.AsyncOpenAI] | None = None

    async def close(self) -> None:
        await self._http.aclose()
        if self._oa is not None:
            await self._oa[1].close()

    async def __aenter__(self) -> AsyncSolanaLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, call: api.Call[T]) -> T:
        headers = {}
        if call.auth:
            if not self.api_key:
                raise SolanaLMError("sign in first (sign_in(keypair)) or pass api_key", code="no_api_key")
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            response = await self._http.request(
                call.method, call.path, json=call.json, params=call.params, headers=headers
            )
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach {self.root}: {exc}", code="connection_failed") from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return call.parse(api.parse_body(response))

    async def _do(self, call: api.Call[T]) -> T:
        async for attempt in AsyncRetrying(**self.retry.tenacity_kwargs(call.idempotent)):
            with attempt:
                return await self._send(call)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _openai(self) -> openai.AsyncOpenAI:
        # No retries inside openai: a completion spends money, so retrying is this SDK's decision.
        if self._oa is None or self._oa[0] != self.api_key:
            # A given transport (tests, proxies) reaches openai through an httpx client of ours; openai's own
            # otherwise (this openai release is built on httpx2, which reads an httpx client by duck typing).
            http: Any = (
                httpx.AsyncClient(timeout=self.timeout_s, transport=self._transport) if self._transport else None
            )
            client = openai.AsyncOpenAI(
                base_url=self.root + "/v1",
                api_key=self.api_key or "open",
                max_retries=0,
                timeout=self.timeout_s,
                http_client=http,
            )
            self._oa = (self.api_key, client)
        return self._oa[1]

    async def sign_in(self, keypair: Keypair | str | Path, ttl_s: int | None = None) -> M.ApiKey:
        """SIWS: challenge, sign, verify; the issued key is used from now on."""
        kp = as_keypair(keypair)
        message = await self._do(api.challenge(str(kp.pubkey())))
        key = await self._do(api.verify(message, sign_message(kp, message), ttl_s))
        self.api_key, self.keypair, self.wallet = key.secret, kp, key.wallet
        return key

    create_key = sign_in

    async def list_keys(self) -> list[M.KeyInfo]:
        return await self._do(api.list_keys())

    async def revoke_key(self, key_id: str) -> bool:
        return await self._do(api.revoke_key(key_id))

    async def models(self) -> list[str]:
        return await self._do(api.models())

    async def _model(self, model: str | None) -> str:
        if model or self.model:
            return str(model or self.model)
        served = await self.models()
        if not served:
            raise SolanaLMError("the gateway serves no model", code="no_model")
        self.model = served[0]
        return self.model

    async def inference(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        **kwargs: Any,
    ) -> M.InferenceResult:
        """A chat completion through `openai.AsyncOpenAI`; the result carries its settlement id."""
        body = api.chat_messages(prompt, messages)
        name = await self._model(model)
        async for attempt in AsyncRetrying(**self.retry.tenacity_kwargs(idempotent=False)):
            with attempt, openai_errors():
                raw = await self._openai().chat.completions.with_raw_response.create(
                    model=name, messages=cast(Any, body), max_tokens=max_tokens, temperature=temperature, **kwargs
                )
                parsed = raw.parse()  # the legacy raw response parses synchronously, the newer one awaits
                return api.result_of(await parsed if inspect.isawaitable(parsed) else parsed, raw.headers)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        **kwargs: Any,
    ) -> AsyncInferenceStream:
        """A streamed chat completion: `async for` its text deltas, then `await .result()`."""
        body = api.chat_messages(prompt, messages)
        name = await self._model(model)
        with openai_errors():
            chunks = await self._openai().chat.completions.create(
                model=name,
                messages=cast(Any, body),
                max_tokens=max_tokens,
                temperature=temperature,
                stream=True,
                stream_options=cast(Any, {"include_usage": True}),
                **kwargs,
            )
        return AsyncInferenceStream(chunks, api.StreamState(name, chunks.response.headers.get("x-request-id")))

    async def balance(self) -> M.Balance:
        return await self._do(api.balance())

    async def receipt(self, settlement_id: str) -> M.Receipt:
        return await self._do(api.receipt(settlement_id))

    async def deposit_info(self) -> M.DepositInfo:
        return await self._do(api.deposit_info())

    async def deposit(
        self, amount: int, *, keypair: Keypair | str | Path | None = None, rpc_url: str | None = None
    ) -> M.Deposit:
        """As `SolanaLMClient.deposit`: relayed by the gateway by default, or sent to `rpc_url`."""
        kp = as_keypair(keypair) if keypair is not None else self.keypair
        if kp is None:
            raise SolanaLMError("a deposit needs the wallet's keypair: sign in or pass keypair", code="no_keypair")
        tx = deposit_transaction(kp, await self.deposit_info(), amount)
        if rpc_url is None:
            return await self._do(api.credit_deposit(transaction_b64=base64.b64encode(tx).decode()))
        return await self._do(api.credit_deposit(signature=await self._send_rpc(rpc_url, tx)))

    async def _send_rpc(self, rpc_url: str, tx: bytes, timeout_s: float = 60.0) -> str:
        async with httpx.AsyncClient(timeout=30) as rpc:
            signature = parse_rpc(await _post(rpc, rpc_url, send_params(tx)))
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                statuses = parse_rpc(await _post(rpc, rpc_url, confirm_params(signature)))["value"]
                if statuses and statuses[0] and statuses[0].get("confirmationStatus") in ("confirmed", "finalized"):
                    if statuses[0].get("err"):
                        raise SolanaLMError(f"deposit transaction failed: {statuses[0]['err']}", code="deposit_failed")
                    return str(signature)
                await asyncio.sleep(1.0)
        raise SolanaLMError(f"deposit {signature} not confirmed within {timeout_s:.0f} s", code="deposit_timeout")

    async def payouts(self) -> list[M.Payout]:
        return await self._do(api.payouts())

    async def earnings(self) -> M.Earnings:
        balance = await self.balance()
        return api.earnings(balance.wallet, balance, await self.payouts())

    async def provider_status(self, wallet: str | None = None) -> M.ProviderStatus:
        who = wallet or self.wallet
        if who is None:
            raise SolanaLMError("give the provider's wallet or sign in first", code="no_wallet", param="wallet")
        return api.provider_status(who, await self._do(api.network_nodes()))


async def _post(rpc: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> httpx.Response:
    try:
        return await rpc.post(url, json=payload)
    except httpx.HTTPError as exc:
        raise ConnectionFailed(f"cannot reach the RPC node {url}: {exc}", code="rpc_unreachable") from exc


class AsyncInferenceStream:
    """Text deltas of a streamed completion (`async for`); `await .result()` once exhausted."""

    def __init__(self, chunks: Any, state: api.StreamState) -> None:
        self._chunks, self._state = chunks, state
        self._done = False

    async def __aiter__(self) -> AsyncIterator[str]:
        with openai_errors():
            async for chunk in self._chunks:
                text = self._state.take(chunk)
                if text:
                    yield text
        self._done = True

    async def result(self) -> M.InferenceResult:
        if not self._done:
            async for _ in self:
                pass
        return self._state.result()
