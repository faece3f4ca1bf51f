"""The FastAPI gateway: OpenAI chat/completions/models, SSE streaming, health; mounted on Ray Serve.

`create_gateway_app(gateway)` builds a plain FastAPI app around a `Gateway` (what the routes call), so
tests drive it in-process; `OpenAIIngress` is the Serve ingress deployment that wires real handles.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr

from cluster.observability.logs import REQUEST_ID
from payments.client import PaymentsUnavailable
from payments.http import build_router
from payments.protocol import SETTLEMENT_HEADER, WalletIdentity
from serve_apps import metrics
from serve_apps.dashboard.routes import build_dashboard_router
from serve_apps.engine.messages import SamplingParams
from serve_apps.gateway import logprobs as L
from serve_apps.gateway import responses as R
from serve_apps.gateway.backend import PipelineBackend, PipelineLost
from serve_apps.gateway.current import current_gateway
from serve_apps.gateway.embeddings import EmbeddingRequest, create_embeddings
from serve_apps.gateway.errors import OpenAIError, error_body, install_error_handlers
from serve_apps.gateway.limits import BodySizeLimit, RateLimitMiddleware, RequestLimiter, retry_after_header
from serve_apps.gateway.metering import HoldCloser, Metering, abandoned
from serve_apps.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from serve_apps.gateway.operator import require_operator
from serve_apps.gateway.providers import ProviderRegistryAPI, build_provider_router, public_nodes
from serve_apps.gateway.responses_api import ResponsesRequest, create_response
from serve_apps.gateway.structured import grammar_for
from serve_apps.gateway.tool_calls import ToolCallStream, parse_tool_calls
from serve_apps.mcp.http import mount_mcp
from serve_apps.protocol import (
    Accepted,
    ChatTurn,
    ChoiceEnd,
    Finished,
    GenerateEvent,
    GenerateRequest,
    Rejected,
    TextDelta,
    TokenScore,
)

DEFAULT_CONTEXT = 2048
REPLICA_RETRIES = 2  # a non-streamed request whose replica died is re-sent this many times
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    owned_by: str
    max_model_len: int | None = None
    backend: str = "transformers"  # shown in /v1/models: transformers | llamacpp | vllm | proxy
    embeddings: bool = False  # the catalogue marks it embedding-capable (/v1/embeddings)


class Gateway:
    """What the HTTP routes do, independent of FastAPI and of how pipelines are reached."""

    def __init__(
        self,
        backend: PipelineBackend,
        cards: list[ModelCard],
        request_timeout_s: float = 600.0,
        metering: Metering | None = None,
        limiter: RequestLimiter | None = None,
        network_nodes: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None,
        providers: ProviderRegistryAPI | None = None,
        operator_token: SecretStr | None = None,
    ) -> None:
        self.operator_token = operator_token  # opens the detail views (operator.py); None: no detail
        self.network_nodes = network_nodes
        self.providers = providers  # out-of-cluster providers register through it (routes in providers.py)
        self.backend = backend
        self.limiter = limiter  # None: no rate limits (in-process apps of tests and tools)
        self.metering = metering or Metering(None)
        self.cards = {card.id: card for card in cards}
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())

    def list_models(self) -> dict:
        data = [
            {"id": c.id, "object": "model", "created": self.created, "owned_by": c.owned_by, "backend": c.backend}
            for c in self.cards.values()
        ]
        return {"object": "list", "data": data}

    async def caller(self, authorization: str | None) -> WalletIdentity | None:
        """Who is calling (401 when payments are on and the key is bad); a signed-in wallet's rate-limit
        bucket is taken here, whichever key or address it uses (the address's was taken by the middleware)."""
        identity = await self.metering.authenticate(authorization)
        if identity is not None and identity.key_id is not None and self.limiter is not None:
            wait_s = self.limiter.check_wallet(identity.wallet)
            if wait_s > 0:
                raise OpenAIError(
                    429,
                    "rate limit reached for this wallet; retry later",
                    code="rate_limit_exceeded",
                    headers=retry_after_header(wait_s),
                )
        return identity

    def to_generate_request(self, body: ChatCompletionRequest | CompletionRequest) -> GenerateRequest:
        if body.model not in self.cards or body.model not in self.backend.models():
            raise OpenAIError(404, f"The model `{body.model}` does not exist.", "model", "model_not_found")
        limit = body.token_limit()
        cap = None if limit is not None else self.hold_tokens(body)  # the replica stops where the hold ends
        sampling = SamplingParams(
            max_tokens=limit or 1,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            seed=body.seed,
            stop=body.stop_list(),
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=body.bias_pairs(),
            logprobs=body.logprobs_k(),
        )
        self._check_sampling(body)
        if body.choices() > 1:
            raise OpenAIError(400, "n > 1 is not supported yet", "n", "unsupported_value")
        if isinstance(body, ChatCompletionRequest):
            return GenerateRequest(
                f"chatcmpl-{uuid.uuid4().hex}",
                body.model,
                sampling,
                messages=tuple(_turn(m) for m in body.messages),
                max_tokens_given=limit is not None,
                max_tokens_cap=cap,
                n=body.choices(),
                **self._structured(body),
            )
        return GenerateRequest(
            f"cmpl-{uuid.uuid4().hex}",
            body.model,
            sampling,
            prompt=body.prompt_text(),
            max_tokens_given=limit is not None,
            max_tokens_cap=cap,
            n=body.choices(),
        )

    def _check_sampling(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        """A 400 naming the backend for sampling fields only SolanaLM's own pipeline honours (llama.cpp's,
        vLLM's and a proxy's adapters do not forward them; they would be silently ignored)."""
        backend = self.cards[body.model].backend
        if backend == "transformers":
            return
        asked = {
            "presence_penalty": bool(body.presence_penalty),
            "frequency_penalty": bool(body.frequency_penalty),
            "logit_bias": bool(body.logit_bias),
            "logprobs": body.logprobs_k() is not None,
            "n": body.choices() > 1,
        }
        for param, given in asked.items():
            if given:
                raise OpenAIError(
                    400,
                    f"{param} is not supported by the {backend} backend serving `{body.model}` "
                    "(penalties, logit_bias, logprobs and n > 1 run on SolanaLM's own pipeline backend only)",
                    param,
                    "unsupported_on_backend",
                )

    def _structured(self, body: ChatCompletionRequest) -> dict[str, Any]:
        """GenerateRequest's grammar and tools fields; a 400 naming the backend where they cannot be served."""
        grammar = grammar_for(body.response_format, body.tools, body.tool_choice)
        tools = json.dumps([t.model_dump(exclude_none=True) for t in body.tools or []]) if body.tools_active() else None
        backend = self.cards[body.model].backend
        if (grammar is not None or tools is not None) and backend != "transformers":
            param = "tools" if tools is not None else "response_format"
            raise OpenAIError(
                400,
                f"{param} is not supported by the {backend} backend serving `{body.model}` "
                "(tools and structured outputs run on SolanaLM's own pipeline backend only)",
                param,
                "unsupported_on_backend",
            )
        parallel = body.parallel_tool_calls is not False
        return {"grammar": grammar, "tools": tools, "parallel_tool_calls": parallel}

    async def admit(
        self, body: ChatCompletionRequest | CompletionRequest, authorization: str | None, request_id: str | None = None
    ) -> tuple[GenerateRequest, HoldCloser]:
        """Authenticate, translate and hold for `body` (401/402/404/429 as OpenAIError): the request to run and
        what closes its hold. `request_id` replaces the generated id (the Responses API's `resp_...`)."""
        identity = await self.caller(authorization)
        request = self.to_generate_request(body)
        if request_id is not None:
            request = dataclasses.replace(request, request_id=request_id)
        REQUEST_ID.set(request.request_id)  # every log line of this request carries its id
        # n choices may each produce the per-choice limit: all of them are held (the prompt once).
        payer = await self.metering.admit(identity, request, self.hold_tokens(body) * body.choices())
        request = dataclasses.replace(request, payer=payer)  # per-payer replica state (the proxy's cache) keys on it
        return request, self.metering.closer(request, payer)

    async def open_stream(self, request: GenerateRequest) -> tuple[Accepted, AsyncIterator[GenerateEvent]]:
        """Start generation and wait for the replica to accept it (a Rejected becomes an OpenAIError)."""
        started = time.perf_counter()
        events = self.backend.stream(request)
        try:
            first = await asyncio.wait_for(anext(events), self.request_timeout_s)
        except StopAsyncIteration:
            raise OpenAIError(
                503, "the pipeline ended the request without an answer", code="pipeline_unavailable"
            ) from None
        except TimeoutError:
            raise OpenAIError(504, "timed out waiting for the pipeline", code="timeout") from None
        if isinstance(first, Rejected):
            headers = {"Retry-After": str(max(1, int(first.retry_after_s)))} if first.retry_after_s else None
            raise OpenAIError(first.status, first.message, first.param, first.code, headers)
        if not isinstance(first, Accepted):
            raise OpenAIError(500, f"unexpected first event {type(first).__name__}", code="internal_error")
        metrics.mark_accepted()
        return first, metrics.observe_events(request.model, started, events)

    async def open_stream_retrying(self, request: GenerateRequest) -> tuple[Accepted, AsyncIterator[GenerateEvent]]:
        """open_stream, re-sent to another replica if the first one dies before accepting."""
        for attempt in range(1, REPLICA_RETRIES + 2):
            try:
                return await self.open_stream(request)
            except PipelineLost as exc:
                logger.warning("replica lost before accepting %s (attempt %d): %s", request.request_id, attempt, exc)
        raise OpenAIError(
            503, "the pipeline replica was lost; retry later", code="pipeline_unavailable", headers={"Retry-After": "5"}
        )

    def hold_tokens(self, body: ChatCompletionRequest | CompletionRequest) -> int:
        """The most completion tokens a request may produce: what it asked for, else the model's context (the
        catalogue's). The request carries it as `max_tokens_cap`, so a replica that allows a longer context
        still stops where the hold ends: no token goes unbilled."""
        card = self.cards[body.model]
        return body.token_limit() or card.max_model_len or DEFAULT_CONTEXT

    async def complete(self, request: GenerateRequest, chat: bool, hold: HoldCloser) -> dict:
        """A whole (non-streamed) answer; a lost replica is retried on another, nothing was sent yet."""
        for attempt in range(1, REPLICA_RETRIES + 2):
            try:
                return await self._complete_once(request, chat, hold)
            except PipelineLost as exc:
                logger.warning("replica lost during %s (attempt %d): %s", request.request_id, attempt, exc)
        raise OpenAIError(
            503, "the pipeline replica was lost; retry later", code="pipeline_unavailable", headers={"Retry-After": "5"}
        )

    async def _complete_once(self, request: GenerateRequest, chat: bool, hold: HoldCloser) -> dict:
        accepted, events = await self.open_stream(request)
        meta = R.ResponseMeta.new(request.request_id, request.model, chat)
        parts: list[list[str]] = [[] for _ in range(request.n)]
        scores: list[list[TokenScore]] = [[] for _ in range(request.n)]
        ends: dict[int, str] = {}
        finished: Finished | None = None
        produced = 0  # completion tokens produced so far (all choices)
        try:
            async with asyncio.timeout(self.request_timeout_s):
                async for event in events:
                    if isinstance(event, TextDelta) and 0 <= event.index < request.n:
                        parts[event.index].append(event.text)
                        scores[event.index].extend(event.logprobs)
                        produced = event.completion_tokens
                    elif isinstance(event, ChoiceEnd):
                        ends[event.index] = event.finish_reason
                    elif isinstance(event, Finished):
                        finished = event
        except asyncio.CancelledError:  # the client went away: it pays for what was produced for it
            hold.settle(abandoned(accepted, produced))
            raise
        except TimeoutError:  # nothing reached the client: the caller releases the hold
            raise OpenAIError(504, "timed out waiting for the pipeline", code="timeout") from None
        if finished is None or finished.finish_reason == "error":
            reason = finished.error if finished else "stream ended early"
            raise OpenAIError(503, f"generation failed: {reason}", code="pipeline_unavailable")
        # Finished's counts are final (a proxy learns the prompt's tokens only from its upstream's last chunk);
        # tool-call tokens and every choice's tokens are completion tokens like any other, so all are metered.
        choices = [
            self._choice(request, chat, "".join(parts[i]), ends.get(i, finished.finish_reason), scores[i])
            for i in range(request.n)
        ]
        body = R.full_response_choices(meta, choices, finished.prompt_tokens, finished.completion_tokens)
        settlement_id = await asyncio.shield(hold.settle(finished))
        if settlement_id is not None:
            body["settlement_id"] = settlement_id
        return body

    @staticmethod
    def _choice(
        request: GenerateRequest, chat: bool, text: str, finish_reason: str, scores: list[TokenScore]
    ) -> R.ChoiceOut:
        content: str | None = text
        calls: list[dict] = []
        if chat and request.tools:
            content, parsed = parse_tool_calls(text, request.tool_names(), request.parallel_tool_calls)
            calls = [call.as_openai() for call in parsed]
        logprobs = None
        if request.sampling.logprobs is not None:
            logprobs = L.chat_logprobs(scores) if chat else L.CompletionLogprobs().part(scores)
        return R.ChoiceOut(content, finish_reason, calls, logprobs)

    async def sse_events(
        self,
        request: GenerateRequest,
        events: AsyncIterator[GenerateEvent],
        accepted: Accepted,
        chat: bool,
        include_usage: bool,
        hold: HoldCloser | None = None,
    ) -> AsyncIterator[str]:
        """chunk_events as SSE `data:` lines; closing this closes them (a client that left pays, see there)."""
        chunks = self.chunk_events(request, events, accepted, chat, include_usage, hold)
        async with contextlib.aclosing(chunks):
            async for item in chunks:
                yield R.sse(item)

    async def chunk_events(
        self,
        request: GenerateRequest,
        events: AsyncIterator[GenerateEvent],
        accepted: Accepted,
        chat: bool,
        include_usage: bool,
        hold: HoldCloser | None = None,
    ) -> AsyncGenerator[dict | str, None]:
        """The stream's chunks (dicts, OpenAI error bodies, "[DONE]"); the final chunk carries the settlement
        id (headers are gone by then). The Responses API (responses_api.py) reads them as they come.

        A stream that ends without its Finished: a client that went away (this generator is cancelled or
        closed) or outlived the request timeout (it may read slowly) pays for the prompt and the tokens it
        was sent; a pipeline failure is ours, and its hold is released.
        """
        hold = hold or self.metering.closer(request, None)
        meta = R.ResponseMeta.new(request.request_id, request.model, chat)
        sent = 0  # completion tokens handed to the client
        deadline = asyncio.get_running_loop().time() + self.request_timeout_s

        def out(body: dict) -> dict:  # with include_usage every chunk but the last has "usage": null (OpenAI's)
            if include_usage:
                body.setdefault("usage", None)
            return body

        choices = [_StreamChoice(request, chat, i) for i in range(request.n)]
        try:
            if chat:
                for choice in choices:
                    yield out(R.chunk(meta, None, None, first=True, index=choice.index))
            async for event in _until_lost(_before(deadline, events)):
                if isinstance(event, PipelineLost):
                    hold.release("pipeline lost")
                    yield error_body(503, f"the pipeline replica was lost: {event}", code="pipeline_unavailable")
                    break
                if isinstance(event, TextDelta) and 0 <= event.index < len(choices):
                    sent = event.completion_tokens
                    part = choices[event.index].feed(event)
                    if part is not None:
                        yield out(R.chunk(meta, part[0], None, index=event.index, logprobs=part[1]))
                elif isinstance(event, ChoiceEnd) and 0 <= event.index < len(choices):
                    choices[event.index].finish_reason = event.finish_reason
                elif isinstance(event, Finished):
                    if event.finish_reason == "error":
                        hold.release("generation failed")
                        yield error_body(503, f"generation failed: {event.error}", code="pipeline_unavailable")
                        break
                    try:
                        settlement_id = await asyncio.shield(hold.settle(event))
                    except OpenAIError as exc:  # settlement failed (its hold was released): say so, in band
                        yield error_body(exc.status, exc.message, exc.param, exc.code)
                        break
                    finals = [body for choice in choices for body in choice.finish(meta, event.finish_reason)]
                    if settlement_id is not None:
                        finals[-1]["settlement_id"] = settlement_id
                    for body in finals:
                        yield out(body)
                    if include_usage:
                        yield R.usage_chunk(meta, event.prompt_tokens, event.completion_tokens)
                    break
            yield "[DONE]"
        except TimeoutError:
            hold.settle(abandoned(accepted, sent))
            yield error_body(504, "the request timed out", code="timeout")
            yield "[DONE]"
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            hold.settle(abandoned(accepted, sent))
            raise
        finally:
            hold.release("not completed")  # nothing if closed above; else the stream broke on our side


class _StreamChoice:
    """One choice of a streamed answer: its tool-call parser (chat with tools), the logprobs not yet sent
    (their text is held by the parser) and the legacy logprobs' text offsets (completions)."""

    def __init__(self, request: GenerateRequest, chat: bool, index: int) -> None:
        self.index, self.chat = index, chat
        calls = chat and bool(request.tools)
        self.tools = ToolCallStream(request.tool_names(), request.parallel_tool_calls) if calls else None
        self.scored = request.sampling.logprobs is not None
        self.pending: list[TokenScore] = []
        self.offsets = L.CompletionLogprobs()
        self.finish_reason: str | None = None  # a ChoiceEnd's (n > 1); else the request's Finished's

    def feed(self, event: TextDelta) -> tuple[str, dict | None] | None:
        """The chunk's text and logprobs for a delta, or None while the parser holds its text."""
        text = self.tools.feed(event.text) if self.tools is not None else event.text
        self.pending.extend(event.logprobs)
        return (text, self._take()) if text else None

    def finish(self, meta: R.ResponseMeta, finish_reason: str) -> list[dict]:
        """The choice's last chunks: held text, tool calls, then its finish_reason (with what logprobs remain)."""
        bodies: list[dict] = []
        reason = self.finish_reason or finish_reason
        if self.tools is not None:
            content, calls = self.tools.finish()
            if content:
                bodies.append(R.chunk(meta, content, None, index=self.index, logprobs=self._take()))
            bodies += R.tool_call_chunks(meta, [call.as_openai() for call in calls], choice=self.index)
            reason = "tool_calls" if calls else reason
        bodies.append(R.chunk(meta, None, reason, index=self.index, logprobs=self._take() if self.pending else None))
        return bodies

    def _take(self) -> dict | None:
        if not self.scored:
            return None
        scores, self.pending = self.pending, []
        return L.chat_logprobs(scores) if self.chat else self.offsets.part(scores)


def _turn(message: Any) -> ChatTurn:
    """A validated chat message as the replica's turn (developer is system; tool calls as JSON text)."""
    calls = json.dumps([call.model_dump() for call in message.tool_calls]) if message.tool_calls else None
    return ChatTurn(
        "system" if message.role == "developer" else message.role,
        message.text(),
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        name=message.name if message.role == "tool" else None,
    )


async def _before(deadline: float, events: AsyncIterator[GenerateEvent]) -> AsyncIterator[GenerateEvent]:
    """The events, raising TimeoutError when the next one has not come by `deadline` (the loop's clock).
    The timeout covers each wait, never a yield: the consumer's task is not cancelled while it sends."""
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                event = await anext(events)
        except StopAsyncIteration:
            return
        yield event


async def _until_lost(events: AsyncIterator[GenerateEvent]) -> AsyncIterator[GenerateEvent | PipelineLost]:
    """The stream's events, ending with the PipelineLost error as an item (a stream cannot be retried)."""
    try:
        async for event in events:
            yield event
    except PipelineLost as exc:
        yield exc


def create_gateway_app(gateway: Gateway | None = None, max_body_bytes: int = 1_000_000) -> FastAPI:
    """The OpenAI-compatible FastAPI app; `app.state.gateway` is what its routes call."""
    app = FastAPI(title="SolanaLM", version="0.1.0", description="OpenAI-compatible API of a SolanaLM gateway.")
    app.state.gateway = gateway
    app.state.max_body_bytes = max_body_bytes  # in-process apps; Serve uses current.py
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(RateLimitMiddleware, limiter_of=_limiter_of)  # outermost: before the body is read
    install_error_handlers(app)

    def core(request: Request) -> Gateway:
        current = request.app.state.gateway or current_gateway()
        if current is None:
            raise OpenAIError(503, "gateway is starting", code="starting")
        return current

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        return core(request).list_models()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, authorization: str | None = Header(default=None)
    ) -> JSONResponse | StreamingResponse:
        return await _respond(core(request), body, True, authorization)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request, authorization: str | None = Header(default=None)
    ) -> JSONResponse | StreamingResponse:
        return await _respond(core(request), body, False, authorization)

    @app.post("/v1/responses", response_model=None)
    async def responses(
        body: ResponsesRequest, request: Request, authorization: str | None = Header(default=None)
    ) -> JSONResponse | StreamingResponse:
        return await create_response(core(request), body, authorization)

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(
        body: EmbeddingRequest, request: Request, authorization: str | None = Header(default=None)
    ) -> JSONResponse:
        return await create_embeddings(core(request), body, authorization)

    @app.get("/healthz")
    async def healthz(
        request: Request, detail: bool = False, authorization: str | None = Header(default=None)
    ) -> JSONResponse:
        gateway = core(request)
        if detail:  # pids, node ids, errors: the operator's (anyone else gets liveness only)
            require_operator(gateway.operator_token, authorization)
        return await _health(gateway, detail)

    @app.get("/v1/network/nodes")
    async def network_nodes(
        request: Request, detail: bool = False, authorization: str | None = Header(default=None)
    ) -> dict:
        if detail:  # node ids, endpoints, labels: the operator's
            require_operator(core(request).operator_token, authorization)
        source = core(request).network_nodes
        if source is None:
            raise OpenAIError(503, "this gateway has no provider registry", code="registry_unavailable")
        try:
            nodes = await source()
        except LookupError as exc:
            raise OpenAIError(503, str(exc), code="registry_unavailable") from None
        return {"object": "list", "data": public_nodes(nodes, detail)}

    # Wallet sign-in, balance, deposits and receipts: the payments package's routes, over the same
    # payments client the gateway meters with (503 while payments are disabled).
    app.include_router(build_router(lambda: _payments_of(app)))
    app.include_router(build_provider_router(core))  # provider registration: challenge, register, heartbeat, leave
    app.include_router(build_dashboard_router(core))  # the web dashboard at /dashboard (serve_apps/dashboard)
    mount_mcp(app, lambda: app.state.gateway or current_gateway())  # MCP, streamable HTTP (serve_apps/mcp)
    return app


def _limiter_of(scope: Any) -> RequestLimiter | None:
    """The rate limiter of the gateway serving `scope` (the per-address buckets run before any route)."""
    app = scope.get("app")
    gateway = getattr(getattr(app, "state", None), "gateway", None) or current_gateway()
    return gateway.limiter if gateway is not None else None


def _payments_of(app: FastAPI) -> Any:
    gateway = app.state.gateway or current_gateway()
    if gateway is None or gateway.metering.payments is None:
        raise PaymentsUnavailable("payments are not enabled on this gateway")
    return gateway.metering.payments


async def _respond(  # type: ignore[no-untyped-def]
    gateway: Gateway,
    body: ChatCompletionRequest | CompletionRequest,
    chat: bool,
    authorization: str | None,
):
    """_answer, counting a request rejected before a replica accepted it (metrics count the rest)."""
    try:
        return await _answer(gateway, body, chat, authorization)
    except OpenAIError as exc:
        metrics.record_rejection(body.model if body.model in gateway.cards else "unknown", exc.status)
        raise


async def _answer(  # type: ignore[no-untyped-def]
    gateway: Gateway,
    body: ChatCompletionRequest | CompletionRequest,
    chat: bool,
    authorization: str | None,
):
    request, hold = await gateway.admit(body, authorization)
    try:
        if not body.stream:
            result = await gateway.complete(request, chat, hold)
            headers = {"x-request-id": request.request_id}
            if "settlement_id" in result:
                headers[SETTLEMENT_HEADER] = result["settlement_id"]
            return JSONResponse(result, headers=headers)
        accepted, events = await gateway.open_stream_retrying(request)
    except BaseException:
        hold.release("failed")  # nothing if already closed (a client that left mid-answer pays for it)
        raise
    stream = gateway.sse_events(request, events, accepted, chat, body.include_usage(), hold)
    headers = {"x-request-id": request.request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _health(gateway: Gateway, detail: bool = False) -> JSONResponse:
    """Each model's liveness; `detail` (the operator's view) adds its replica, stages (pid, node, memory,
    busy seconds) and, for a model that cannot answer, the exception."""
    pipelines, healthy = [], True
    for model in gateway.backend.models():
        try:
            info = await asyncio.wait_for(gateway.backend.describe(model), 30)
            stages = [
                {
                    "index": s.stage_index,
                    "layers": [s.layer_start, s.layer_end],
                    "pid": s.pid,
                    "node_id": s.node_id,
                    "rss_bytes": s.rss_bytes,
                    "param_count": s.param_count,
                    "busy_s": s.busy_s,  # compute seconds since the stage started (busy fraction = Δbusy / Δwall)
                    "steps": s.steps,
                }
                for s in info.stages
            ]
            shown: dict[str, Any] = {"model": model, "status": "ok"}
            if detail:
                shown |= {
                    "replica": info.replica_id,
                    "stages": stages,
                    "queue_depth": info.queue_depth,
                    "running": info.running,
                    "max_inflight_steps": info.max_inflight_steps,
                }
            pipelines.append(shown)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: health must answer
            healthy = False
            logger.info("health of %s: %s: %s", model, type(exc).__name__, exc)
            failed = {"model": model, "status": "unavailable"}
            pipelines.append(failed | {"error": f"{type(exc).__name__}: {exc}"} if detail else failed)
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "pipelines": pipelines}, status_code=200 if healthy else 503
    )
