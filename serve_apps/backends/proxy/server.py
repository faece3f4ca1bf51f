"""The proxy replica: forwards each request to its upstream API and streams the answer back.

Everything a client of the gateway sees stays SolanaLM's: the gateway's OpenAI API, metering and
settlement. The upstream is reached with the operator's key (an environment variable, as a SecretStr,
never logged), under a per-replica rate limit and concurrency bound; identical deterministic requests
may be answered from a cache, each payer's own. What the upstream says when it fails is logged here and
replaced by our own message (upstream.py). The operator's wallet is the request's provider and earns the proxy
commission (`Finished.proxy`).
"""

import logging
import os
from collections.abc import AsyncIterator

import httpx
from aiolimiter import AsyncLimiter
from pydantic import SecretStr

from cluster.config import Settings
from cluster.models import load_catalogue
from serve_apps.backends.protocol import AdmissionGate, node_id, node_wallet, replica_id
from serve_apps.backends.proxy.cache import CachedAnswer, ResponseCache, cache_key, cacheable
from serve_apps.backends.proxy.upstream import (
    AnthropicUpstream,
    OpenAIUpstream,
    UpstreamAPI,
    UpstreamDone,
    UpstreamError,
    UpstreamText,
)
from serve_apps.protocol import (
    Accepted,
    Finished,
    GenerateEvent,
    GenerateRequest,
    PipelineInfo,
    ProviderWork,
    ProxyCommission,
    Rejected,
    TextDelta,
)

logger = logging.getLogger(__name__)

UPSTREAM_DOWN_RETRY_S = 5.0


def upstream_key(env_name: str | None, given: SecretStr | None = None) -> SecretStr | None:
    """The upstream key: the replica's environment variable, else the one the builder read."""
    if env_name and os.environ.get(env_name):
        return SecretStr(os.environ[env_name])
    return given


class ProxyServer:
    """Serve replica of one proxied model; implements `ModelReplica`."""

    def __init__(
        self,
        model_name: str,
        settings: dict | Settings,
        api_key: SecretStr | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings if isinstance(settings, Settings) else Settings(**settings)
        self.spec = load_catalogue(self.settings.model.catalogue).get(model_name)
        self.options = options = self.spec.proxy_options()
        self._api_key = upstream_key(options.api_key_env, api_key)
        if options.api_key_env and self._api_key is None:
            logger.warning("%s: %s is not set; calling the upstream without a key", model_name, options.api_key_env)
        self.api: UpstreamAPI = (
            AnthropicUpstream(options.anthropic_version) if options.api == "anthropic" else OpenAIUpstream()
        )
        timeout = httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s)
        self.client = httpx.AsyncClient(base_url=options.base_url, timeout=timeout, transport=transport)
        # A leaky bucket (aiolimiter): rate_limit_burst at once, drained at rate_limit_per_s.
        rate, burst = options.rate_limit_per_s, options.rate_limit_burst
        self.limiter = AsyncLimiter(burst, burst / rate) if rate > 0 else None
        self.gate = AdmissionGate(options.max_concurrency, 0)
        self.cache = ResponseCache(options.cache_entries, options.cache_ttl_s) if options.cache else None
        wallet = options.wallet or node_wallet(self.settings.network.label_prefix)
        self.providers = (ProviderWork(wallet, 1),)
        self.proxy = ProxyCommission(wallet, options.commission_bps)
        self.replica_id = replica_id("proxy")
        self.forwarded = 0
        logger.info("proxy %s -> %s (%s, %s)", model_name, options.base_url, options.api, options.upstream_model)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        """Accepted (or Rejected), the upstream's text as deltas, then one Finished."""
        cache = self.cache  # an empty cache is falsy (len 0): compare with None
        key = cache_key(request, self.options.upstream_model) if cache is not None and cacheable(request) else None
        hit = cache.get(key) if cache is not None and key is not None else None
        if hit is not None:
            for event in self._replay(hit):
                yield event
            return
        if self.limiter is not None:
            if not self.limiter.has_capacity():
                wait_s = 1.0 / self.options.rate_limit_per_s  # one request drains
                yield Rejected(
                    429, "the upstream's rate limit is reached; retry later", None, "rate_limit_exceeded", wait_s
                )
                return
            await self.limiter.acquire()  # at once: there is capacity
        rejected = self.gate.reserve()
        if rejected is not None:
            yield rejected
            return
        try:
            async for event in self._forward(request, key):
                yield event
        finally:
            self.gate.release()

    async def _forward(self, request: GenerateRequest, key: str | None) -> AsyncIterator[GenerateEvent]:
        max_tokens = request.completion_budget(self.options.default_max_tokens)
        api_key = self._api_key.get_secret_value() if self._api_key else None
        call = self.api.call(request, self.options.upstream_model, max_tokens, api_key)
        try:
            upstream = self.client.build_request("POST", call.path, json=call.body, headers=call.headers)
            response = await self.client.send(upstream, stream=True)
        except httpx.TimeoutException:
            yield Rejected(504, "the upstream did not answer in time", code="upstream_timeout", retry_after_s=1.0)
            return
        except httpx.TransportError as exc:
            logger.warning("upstream of %s unreachable: %s", request.model, type(exc).__name__)
            yield Rejected(
                503, "the upstream is unreachable", code="upstream_unavailable", retry_after_s=UPSTREAM_DOWN_RETRY_S
            )
            return
        self.forwarded += 1
        try:
            if response.status_code >= 400:
                error = self.api.error(
                    response.status_code, await response.aread(), response.headers.get("retry-after")
                )
                logger.warning("upstream of %s refused %s: %s", request.model, request.request_id, error.detail)
                yield Rejected(error.status, error.message, error.param, error.code, error.retry_after_s)
                return
            # The upstream reports the prompt's tokens at the end: Finished carries them.
            yield Accepted(0, self.providers, self.proxy)
            async for event in self._relay(request, response, key):
                yield event
        finally:
            await response.aclose()

    async def _relay(
        self, request: GenerateRequest, response: httpx.Response, key: str | None
    ) -> AsyncIterator[GenerateEvent]:
        parts: list[str] = []
        try:
            async for item in self.api.items(response.aiter_lines()):
                if isinstance(item, UpstreamText):
                    parts.append(item.text)
                    yield TextDelta(item.text, len(parts))
                elif isinstance(item, UpstreamDone):
                    answer = self._answer(request, parts, item)
                    if self.cache is not None and key is not None:
                        self.cache.put(key, answer)
                    yield self._finished(answer)
                    return
        except UpstreamError as exc:
            logger.warning("upstream of %s failed during %s: %s", request.model, request.request_id, exc.detail)
            yield Finished("error", 0, len(parts), error=exc.message)
        except httpx.HTTPError as exc:
            logger.warning("upstream stream of %s broke: %s", request.request_id, type(exc).__name__)
            yield Finished("error", 0, len(parts), error=UpstreamError(502).message)

    def _answer(self, request: GenerateRequest, parts: list[str], done: UpstreamDone) -> CachedAnswer:
        # Upstreams that report no usage (some OpenAI-compatible servers) are billed on an estimate.
        prompt = done.prompt_tokens if done.prompt_tokens is not None else estimate_tokens(request)
        completion = done.completion_tokens if done.completion_tokens is not None else len(parts)
        return CachedAnswer("".join(parts), done.finish_reason, prompt, completion)

    def _replay(self, answer: CachedAnswer) -> list[GenerateEvent]:
        events: list[GenerateEvent] = [Accepted(answer.prompt_tokens, self.providers, self.proxy)]
        if answer.text:
            events.append(TextDelta(answer.text, answer.completion_tokens))
        events.append(self._finished(answer))
        return events

    def _finished(self, answer: CachedAnswer) -> Finished:
        return Finished(
            answer.finish_reason,
            answer.prompt_tokens,
            answer.completion_tokens,
            providers=self.providers,
            proxy=self.proxy,
        )

    async def describe(self) -> PipelineInfo:
        extra = {
            "backend": "proxy",
            "api": self.options.api,
            "upstream": self.options.base_url,
            "upstream_model": self.options.upstream_model,
            "forwarded": str(self.forwarded),
        }
        if self.cache is not None:
            extra.update(cache_hits=str(self.cache.hits), cache_entries=str(len(self.cache)))
        return PipelineInfo(
            model=self.spec.name,
            replica_id=self.replica_id,
            node_id=node_id(),
            dtype="remote",
            num_layers=1,
            max_model_len=self.spec.max_model_len or 0,
            stages=(),
            running=self.gate.running,
            extra=extra,
        )

    async def check_health(self) -> None:
        """The replica is healthy while it runs; an unreachable upstream is answered per request (503)."""


def estimate_tokens(request: GenerateRequest) -> int:
    """About four characters per token, for upstreams that do not report usage."""
    if request.prompt is not None:
        return max(1, len(request.prompt) // 4)
    return max(1, sum(len(turn.content) // 4 + 4 for turn in request.messages or ()))
