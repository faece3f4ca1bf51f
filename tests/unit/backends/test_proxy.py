"""The proxy replica over httpx.MockTransport: OpenAI and Anthropic translation, errors, limits, cache."""

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from cluster.config import Settings
from serve_apps.backends.protocol import ModelReplica
from serve_apps.backends.proxy.server import ProxyServer
from serve_apps.engine.messages import SamplingParams
from serve_apps.protocol import (
    Accepted,
    ChatTurn,
    Finished,
    GenerateEvent,
    GenerateRequest,
    ProviderWork,
    ProxyCommission,
    Rejected,
    TextDelta,
)

WALLET = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
Handler = Callable[[httpx.Request], httpx.Response]


def sse(*events: dict | str, named: bool = False) -> bytes:
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        name = f"event: {json.loads(data)['type']}\n" if named and data != "[DONE]" else ""
        out.append(f"{name}data: {data}\n\n")
    return "".join(out).encode()


def openai_stream(*texts: str, finish: str = "stop", usage: tuple[int, int] | None = (11, 2)) -> bytes:
    chunks: list[dict | str] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in texts]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if usage:
        chunks.append({"choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}})
    return sse(*chunks, "[DONE]")


def proxy(write_catalogue, handler: Handler, key: str | None = "sk-up", **options: object) -> ProxyServer:  # type: ignore[no-untyped-def]
    entry = {"base_url": "http://up.test/v1", "upstream_model": "up-model", "wallet": WALLET, **options}
    settings: Settings = write_catalogue({"px": {"backend": "proxy", "proxy": entry}})
    secret = SecretStr(key) if key else None
    return ProxyServer("px", settings, api_key=secret, transport=httpx.MockTransport(handler))


def chat(temperature: float = 0.0, seed: int | None = None, **extra: object) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=5, temperature=temperature, seed=seed, **extra)  # type: ignore[arg-type]
    turns = (ChatTurn("system", "be brief"), ChatTurn("user", "capital of France?"))
    return GenerateRequest("r1", "px", sampling, messages=turns)


def run(replica: ProxyServer, request: GenerateRequest) -> list[GenerateEvent]:
    async def collect() -> list[GenerateEvent]:
        return [event async for event in replica.generate(request)]

    return asyncio.run(collect())


def text_of(events: list[GenerateEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def test_openai_chat_is_forwarded_and_streamed_back(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=openai_stream("Par", "is"), headers={"content-type": "text/event-stream"})

    replica = proxy(write_catalogue, handler, commission_bps=250)
    assert isinstance(replica, ModelReplica)
    events = run(replica, chat(top_k=3, stop=("\n",), seed=4))
    assert isinstance(events[0], Accepted) and text_of(events) == "Paris"
    assert events[-1] == Finished(
        "stop", 11, 2, providers=(ProviderWork(WALLET, 1),), proxy=ProxyCommission(WALLET, 250)
    )
    sent = seen[0]
    body = json.loads(sent.content)
    assert str(sent.url) == "http://up.test/v1/chat/completions" and sent.headers["authorization"] == "Bearer sk-up"
    assert body["model"] == "up-model" and body["messages"][0] == {"role": "system", "content": "be brief"}
    assert (body["max_tokens"], body["temperature"], body["seed"], body["top_k"], body["stop"]) == (
        5,
        0.0,
        4,
        3,
        ["\n"],
    )
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_openai_completion_without_usage_is_estimated(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions" and json.loads(request.content)["prompt"] == "12345678"
        chunks = [{"choices": [{"text": t, "finish_reason": None}]} for t in ("a", "b", "c")]
        chunks.append({"choices": [{"text": "", "finish_reason": "length"}]})
        return httpx.Response(200, content=sse(*chunks, "[DONE]"))

    replica = proxy(write_catalogue, handler, key=None)
    request = GenerateRequest("r", "px", SamplingParams(max_tokens=3), prompt="12345678")
    events = run(replica, request)
    assert text_of(events) == "abc"
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
    assert (events[-1].prompt_tokens, events[-1].completion_tokens) == (2, 3)


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (400, {"error": {"message": "bad stop", "param": "stop", "code": "invalid_value"}}, {}, (400, "invalid_value")),
        (404, {"error": {"message": "no such model", "type": "not_found_error"}}, {}, (404, "not_found_error")),
        (
            429,
            {"error": {"message": "slow down", "code": "rate_limit_exceeded"}},
            {"retry-after": "7"},
            (429, "rate_limit_exceeded"),
        ),
        (401, {"error": {"message": "bad key"}}, {}, (502, "upstream_error")),
        (500, "<html>oops</html>", {}, (502, "upstream_error")),
    ],
)
def test_openai_upstream_errors_keep_their_class(write_catalogue, status, body, headers, expected) -> None:  # type: ignore[no-untyped-def]
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    replica = proxy(write_catalogue, lambda _: httpx.Response(status, content=content, headers=headers))
    (event,) = run(replica, chat())
    assert isinstance(event, Rejected) and (event.status, event.code) == expected
    assert event.retry_after_s == (7.0 if headers else None)
    assert event.message.startswith("the upstream provider") and "oops" not in event.message
    if status == 400:
        assert (event.message, event.param) == ("the upstream provider refused the request", "stop")


def test_upstream_down_is_503_and_timeout_504(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    (refused,) = run(proxy(write_catalogue, down), chat())
    assert isinstance(refused, Rejected) and (refused.status, refused.code) == (503, "upstream_unavailable")
    assert refused.retry_after_s == 5.0
    (late,) = run(proxy(write_catalogue, slow), chat())
    assert isinstance(late, Rejected) and late.status == 504


def test_mid_stream_error_ends_with_an_error_finish(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    content = sse({"choices": [{"delta": {"content": "Pa"}}]}, {"error": {"message": "replica lost"}})
    events = run(proxy(write_catalogue, lambda _: httpx.Response(200, content=content)), chat())
    assert text_of(events) == "Pa"
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "error"
    assert events[-1].error == "the upstream provider failed"  # "replica lost" is logged, not passed on


def test_rate_limit_answers_429_with_retry_after(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    ok = lambda _: httpx.Response(200, content=openai_stream("x"))  # noqa: E731
    replica = proxy(write_catalogue, ok, rate_limit_per_s=0.5, rate_limit_burst=1)
    assert isinstance(run(replica, chat())[-1], Finished)
    (limited,) = run(replica, chat())
    assert isinstance(limited, Rejected) and (limited.status, limited.code) == (429, "rate_limit_exceeded")
    assert limited.retry_after_s is not None and 1.0 < limited.retry_after_s <= 2.0


def test_cache_answers_identical_deterministic_requests(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, content=openai_stream("Paris", usage=(9, 1)))

    replica = proxy(write_catalogue, handler, cache=True)
    first, again = run(replica, chat()), run(replica, chat())
    assert text_of(first) == text_of(again) == "Paris" and len(calls) == 1
    assert again[0] == Accepted(9, first[0].providers, first[0].proxy) and again[-1] == first[-1]
    run(replica, chat(temperature=0.7, seed=1))
    run(replica, chat(temperature=0.7, seed=1))
    run(replica, chat(temperature=0.7))
    run(replica, chat(temperature=0.7))  # sampled without a seed: never cached
    assert len(calls) == 4
    info = asyncio.run(replica.describe())
    assert info.extra["cache_hits"] == "2" and info.extra["backend"] == "proxy" and "sk-up" not in str(info)


def test_the_key_comes_from_the_environment_and_is_never_shown(write_catalogue, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("UP_KEY", "sk-from-env")
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, content=openai_stream("x"))

    replica = proxy(write_catalogue, handler, key="sk-builder", api_key_env="UP_KEY")
    run(replica, chat())
    assert seen == ["Bearer sk-from-env"]
    assert "sk-from-env" not in repr(vars(replica))


def anthropic_stream(*texts: str, stop_reason: str = "end_turn") -> bytes:
    events: list[dict | str] = [
        {"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 21, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
    ]
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in texts]
    events += [
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 3}},
        {"type": "message_stop"},
    ]
    return sse(*events, named=True)


def test_anthropic_request_and_events_are_translated(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=anthropic_stream("Par", "is"))

    replica = proxy(write_catalogue, handler, api="anthropic")
    events = run(replica, chat(temperature=1.7, top_p=0.9, stop=("END",)))
    assert text_of(events) == "Paris"
    assert isinstance(events[-1], Finished) and (events[-1].prompt_tokens, events[-1].completion_tokens) == (21, 3)
    sent = seen[0]
    body = json.loads(sent.content)
    assert sent.url.path == "/v1/messages" and sent.headers["x-api-key"] == "sk-up"
    assert sent.headers["anthropic-version"] == "2023-06-01" and "authorization" not in sent.headers
    assert body["system"] == "be brief" and body["messages"] == [{"role": "user", "content": "capital of France?"}]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["stop_sequences"]) == (5, 1.0, 0.9, ["END"])
    length = run(
        proxy(
            write_catalogue,
            lambda _: httpx.Response(200, content=anthropic_stream("a", stop_reason="max_tokens")),
            api="anthropic",
        ),
        chat(),
    )
    assert isinstance(length[-1], Finished) and length[-1].finish_reason == "length"


def test_anthropic_completion_prompt_becomes_a_user_turn(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, content=anthropic_stream("ok"))

    request = GenerateRequest("r", "px", SamplingParams(), prompt="hello", max_tokens_given=False)
    run(proxy(write_catalogue, handler, api="anthropic", default_max_tokens=77), request)
    assert bodies[0]["messages"] == [{"role": "user", "content": "hello"}] and bodies[0]["max_tokens"] == 77
    assert "system" not in bodies[0]


@pytest.mark.parametrize(
    ("status", "kind", "expected"),
    [
        (400, "invalid_request_error", (400, "invalid_request_error")),
        (429, "rate_limit_error", (429, "rate_limit_exceeded")),
        (529, "overloaded_error", (503, "upstream_unavailable")),
        (401, "authentication_error", (502, "upstream_error")),
    ],
)
def test_anthropic_errors_map_to_statuses(write_catalogue, status: int, kind: str, expected: tuple) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"type": "error", "error": {"type": kind, "message": f"{kind}!"}}).encode()
    replica = proxy(write_catalogue, lambda _: httpx.Response(status, content=body), api="anthropic")
    (event,) = run(replica, chat())
    assert isinstance(event, Rejected) and (event.status, event.code) == expected
    assert event.message.startswith("the upstream provider") and "!" not in event.message


def test_anthropic_error_event_mid_stream(write_catalogue) -> None:  # type: ignore[no-untyped-def]
    content = sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Pa"}},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        named=True,
    )
    events = run(proxy(write_catalogue, lambda _: httpx.Response(200, content=content), api="anthropic"), chat())
    assert text_of(events) == "Pa" and isinstance(events[-1], Finished)
    assert (events[-1].finish_reason, events[-1].error) == ("error", "the upstream provider is overloaded; retry later")
