"""`SolanaLMClient`: the synchronous SDK (see `solanalm_client.aio` for the same calls with await)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import openai
from solders.keypair import Keypair
from tenacity import Retrying

from solanalm_client import api
from solanalm_client import models as M
from solanalm_client.errors import ConnectionFailed, SolanaLMError, error_from_response
from solanalm_client.oai import openai_errors
from solanalm_client.rpc import confirm_params, parse_rpc, send_params
from solanalm_client.wallet import as_keypair, deposit_transaction, sign_message

T = TypeVar("T")


class SolanaLMClient:
    """A SolanaLM gateway, as a wallet sees it.

    with SolanaLMClient("http://127.0.0.1:8000") as client:
        client.sign_in("~/.config/solana/id.json")
        answer = client.inference("Hello", max_tokens=16)
        receipt = client.receipt(answer.settlement_id)
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 120.0,
        retry: api.RetryPolicy | None = None,
        model: str | None = None,
        transport: httpx.BaseTransport | None = None,
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
        self._http = httpx.Client(base_url=self.root, timeout=timeout_s, transport=transport)
        self._oa: tuple[str | None, openai.OpenAI] | None = None

    # Plumbing -------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()
        if self._oa is not None:
            self._oa[1].close()

    def __enter__(self) -> SolanaLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: api.Call[T]) -> T:
        headers = {}
        if call.auth:
            if not self.api_key:
                raise SolanaLMError("sign in first (sign_in(keypair)) or pass api_key", code="no_api_key")
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            response = self._http.request(call.method, call.path, json=call.json, params=call.params, headers=headers)
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"cannot reach {self.root}: {exc}", code="connection_failed") from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return call.parse(api.parse_body(response))

    def _do(self, call: api.Call[T]) -> T:
        for attempt in Retrying(**self.retry.tenacity_kwargs(call.idempotent)):
            with attempt:
                return self._send(call)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def _openai(self) -> openai.OpenAI:
        # No retries inside openai: a completion spends money, so retrying is this SDK's decision.
        if self._oa is None or self._oa[0] != self.api_key:
            # A given transport (tests, proxies) reaches openai through an httpx client of ours; openai's own
            # otherwise (this openai release is built on httpx2, which reads an httpx client by duck typing).
            http: Any = httpx.Client(timeout=self.timeout_s, transport=self._transport) if self._transport else None
            client = openai.OpenAI(
                base_url=self.root + "/v1",
                api_key=self.api_key or "open",
                max_retries=0,
                timeout=self.timeout_s,
                http_client=http,
            )
            self._oa = (self.api_key, client)
        return self._oa[1]

    # Sign-in and keys -----------------------------------------------------------------------------
    def sign_in(self, keypair: Keypair | str | Path, ttl_s: int | None = None) -> M.ApiKey:
        """SIWS: ask a challenge for the keypair's wallet, sign it, get an API key (used from now on)."""
        kp = as_keypair(keypair)
        message = self._do(api.challenge(str(kp.pubkey())))
        key = self._do(api.verify(message, sign_message(kp, message), ttl_s))
        self.api_key, self.keypair, self.wallet = key.secret, kp, key.wallet
        return key

    create_key = sign_in  # every sign-in issues a new key

    def list_keys(self) -> list[M.KeyInfo]:
        return self._do(api.list_keys())

    def revoke_key(self, key_id: str) -> bool:
        return self._do(api.revoke_key(key_id))

    # Inference ------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        return self._do(api.models())

    def _model(self, model: str | None) -> str:
        if model or self.model:
            return str(model or self.model)
        served = self.models()
        if not served:
            raise SolanaLMError("the gateway serves no model", code="no_model")
        self.model = served[0]
        return self.model

    def inference(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        **kwargs: Any,
    ) -> M.InferenceResult:
        """A chat completion through the official `openai` client; the result carries its settlement id."""
        body = api.chat_messages(prompt, messages)
        name = self._model(model)
        for attempt in Retrying(**self.retry.tenacity_kwargs(idempotent=False)):
            with attempt, openai_errors():
                raw = self._openai().chat.completions.with_raw_response.create(
                    model=name, messages=cast(Any, body), max_tokens=max_tokens, temperature=temperature, **kwargs
                )
                return api.result_of(raw.parse(), raw.headers)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        **kwargs: Any,
    ) -> InferenceStream:
        """A streamed chat completion: iterate it for text deltas, then read `.result` (settlement id included)."""
        body = api.chat_messages(prompt, messages)
        name = self._model(model)
        with openai_errors():
            chunks = self._openai().chat.completions.create(
                model=name,
                messages=cast(Any, body),
                max_tokens=max_tokens,
                temperature=temperature,
                stream=True,
                stream_options=cast(Any, {"include_usage": True}),
                **kwargs,
            )
        return InferenceStream(chunks, api.StreamState(name, chunks.response.headers.get("x-request-id")))

    # Money ----------------------------------------------------------------------------------------
    def balance(self) -> M.Balance:
        return self._do(api.balance())

    def receipt(self, settlement_id: str) -> M.Receipt:
        return self._do(api.receipt(settlement_id))

    def deposit_info(self) -> M.DepositInfo:
        return self._do(api.deposit_info())

    def deposit(
        self, amount: int, *, keypair: Keypair | str | Path | None = None, rpc_url: str | None = None
    ) -> M.Deposit:
        """Transfer `amount` to the treasury and have it credited: relayed by the gateway (LiteSVM) by default,
        or sent by this client to `rpc_url` (a real cluster) and credited by signature once confirmed."""
        kp = as_keypair(keypair) if keypair is not None else self.keypair
        if kp is None:
            raise SolanaLMError("a deposit needs the wallet's keypair: sign in or pass keypair", code="no_keypair")
        tx = deposit_transaction(kp, self.deposit_info(), amount)
        if rpc_url is None:
            return self._do(api.credit_deposit(transaction_b64=base64.b64encode(tx).decode()))
        return self._do(api.credit_deposit(signature=self._send_rpc(rpc_url, tx)))

    def _send_rpc(self, rpc_url: str, tx: bytes, timeout_s: float = 60.0) -> str:
        with httpx.Client(timeout=30) as rpc:
            signature = parse_rpc(_post(rpc, rpc_url, send_params(tx)))
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                statuses = parse_rpc(_post(rpc, rpc_url, confirm_params(signature)))["value"]
                if statuses and statuses[0] and statuses[0].get("confirmationStatus") in ("confirmed", "finalized"):
                    if statuses[0].get("err"):
                        raise SolanaLMError(f"deposit transaction failed: {statuses[0]['err']}", code="deposit_failed")
                    return str(signature)
                time.sleep(1.0)
        raise SolanaLMError(f"deposit {signature} not confirmed within {timeout_s:.0f} s", code="deposit_timeout")

    # Providers ------------------------------------------------------------------------------------
    def payouts(self) -> list[M.Payout]:
        return self._do(api.payouts())

    def earnings(self) -> M.Earnings:
        balance = self.balance()
        return api.earnings(balance.wallet, balance, self.payouts())

    def provider_status(self, wallet: str | None = None) -> M.ProviderStatus:
        who = wallet or self.wallet
        if who is None:
            raise SolanaLMError("give the provider's wallet or sign in first", code="no_wallet", param="wallet")
        return api.provider_status(who, self._do(api.network_nodes()))


def _post(rpc: httpx.Client, url: str, payload: dict[str, Any]) -> httpx.Response:
    try:
        return rpc.post(url, json=payload)
    except httpx.HTTPError as exc:
        raise ConnectionFailed(f"cannot reach the RPC node {url}: {exc}", code="rpc_unreachable") from exc


class InferenceStream:
    """Text deltas of a streamed completion; `.result` (with the settlement id) once it is exhausted."""

    def __init__(self, chunks: Any, state: api.StreamState) -> None:
        self._chunks, self._state = chunks, state
        self._done = False

    def __iter__(self) -> Iterator[str]:
        with openai_errors():
            for chunk in self._chunks:
                text = self._state.take(chunk)
                if text:
                    yield text
        self._done = True

    @property
    def result(self) -> M.InferenceResult:
        if not self._done:
            for _ in self:
                pass
        return self._state.result()

    def close(self) -> None:
        self._chunks.close()
