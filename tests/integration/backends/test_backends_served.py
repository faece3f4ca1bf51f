"""Backends behind the deployed gateway, through the official openai client.

Proxies forward to a second SolanaLM instance (tiny-llama): answers equal the upstream's own, streams
pass through, upstream errors keep their status, an unreachable upstream is a 503, a repeated
deterministic request is answered from the cache. The llama.cpp replica serves the SmolLM2 GGUF.
"""

import httpx
import openai
import pytest

from tests.integration.backends.conftest import (
    GGUF_MODEL,
    HAS_LLAMA_CPP,
    PROXY_WALLET,
    UPSTREAM_KEY,
    Deployed,
    Upstream,
)

CHAT = [{"role": "user", "content": "Tell me about the sea."}]


def test_models_list_each_backend_and_owner(deployed: Deployed) -> None:
    models = {m.id: m for m in deployed.client().models.list().data}
    assert models["tiny-proxy"].backend == "proxy"  # type: ignore[attr-defined]
    assert models["tiny-proxy"].owned_by == "upstream-operator"
    if HAS_LLAMA_CPP:
        assert models[GGUF_MODEL].backend == "llamacpp"  # type: ignore[attr-defined]
        assert models[GGUF_MODEL].owned_by == "HuggingFaceTB"
    health = httpx.get(deployed.base_url.removesuffix("/v1") + "/healthz", timeout=60)
    assert health.status_code == 200 and {p["status"] for p in health.json()["pipelines"]} == {"ok"}
    assert {p["model"] for p in health.json()["pipelines"]} == set(models)


def test_proxy_answers_as_the_upstream_does(deployed: Deployed, upstream: Upstream) -> None:
    direct = upstream.client().chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=8, temperature=0)
    before = list(upstream.recorder.seen)
    raw = deployed.client().chat.completions.with_raw_response.create(
        model="tiny-proxy", messages=CHAT, max_tokens=8, temperature=0
    )
    proxied = raw.parse()
    assert proxied.model == "tiny-proxy" and proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.usage is not None and direct.usage is not None
    assert (proxied.usage.prompt_tokens, proxied.usage.completion_tokens) == (
        direct.usage.prompt_tokens,
        direct.usage.completion_tokens,
    )
    settlement_id = raw.headers.get("x-solanalm-settlement-id", "")
    receipt = httpx.get(f"{deployed.base_url}/receipts/{settlement_id}", timeout=30).json()
    # The proxy operator is the provider and takes the proxy commission (amounts are 0 in open mode).
    roles = {(share["role"], share["wallet"]) for share in receipt["shares"]}
    assert {("provider", PROXY_WALLET), ("proxy", PROXY_WALLET)} <= roles, receipt
    assert (receipt["prompt_tokens"], receipt["completion_tokens"]) == (
        direct.usage.prompt_tokens,
        direct.usage.completion_tokens,
    )
    # The upstream saw the operator's key from the environment variable, never the client's.
    assert upstream.recorder.seen[len(before) :] == [("/v1/chat/completions", f"Bearer {UPSTREAM_KEY}")]


def test_proxy_streams_completions(deployed: Deployed, upstream: Upstream) -> None:
    kwargs = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.0, "seed": None}
    direct = upstream.client().completions.create(model="tiny-llama", **kwargs)  # type: ignore[arg-type]
    chunks = list(
        deployed.client().completions.create(
            model="tiny-proxy",
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,  # type: ignore[arg-type]
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == direct.choices[0].text and len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == direct.usage.completion_tokens  # type: ignore[union-attr]


def test_identical_deterministic_request_is_answered_from_the_cache(deployed: Deployed, upstream: Upstream) -> None:
    api = deployed.client()
    messages = [{"role": "user", "content": "A cached question."}]
    first_calls = upstream.recorder.completions()
    first = api.chat.completions.create(model="tiny-proxy", messages=messages, max_tokens=6, temperature=0)
    second = api.chat.completions.create(model="tiny-proxy", messages=messages, max_tokens=6, temperature=0)
    assert upstream.recorder.completions() == first_calls + 1
    assert second.choices[0].message.content == first.choices[0].message.content
    sampled = {"messages": messages, "max_tokens": 6, "temperature": 0.9}
    api.chat.completions.create(model="tiny-proxy", **sampled)  # type: ignore[arg-type]
    api.chat.completions.create(model="tiny-proxy", **sampled)  # type: ignore[arg-type]
    assert upstream.recorder.completions() == first_calls + 3  # sampled without a seed: never cached


def test_upstream_errors_keep_their_class_not_their_text(deployed: Deployed) -> None:
    api = deployed.client()
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="tiny-proxy-missing", messages=CHAT, max_tokens=4)
    # The upstream's own text (naming its model, "no-such-model") stays in the replica's log.
    assert "no-such-model" not in missing.value.message and missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        api.chat.completions.create(model="tiny-proxy", messages=CHAT, max_tokens=600)
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "max_tokens"


def test_upstream_down_is_503_with_retry_after(deployed: Deployed) -> None:
    with pytest.raises(openai.InternalServerError) as down:
        deployed.client().chat.completions.create(model="tiny-proxy-down", messages=CHAT, max_tokens=4)
    assert down.value.status_code == 503 and down.value.code == "upstream_unavailable"
    assert down.value.response.headers["retry-after"] == "5"
    stream = httpx.post(
        f"{deployed.base_url}/chat/completions",
        json={"model": "tiny-proxy-down", "messages": CHAT, "stream": True},
        timeout=60,
    )
    assert stream.status_code == 503 and stream.json()["error"]["code"] == "upstream_unavailable"


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (extra `cpu`; CI does not build it)")
def test_llamacpp_serves_the_smollm2_gguf(deployed: Deployed) -> None:
    api = deployed.client()
    # With the GGUF's default system turn, llama.cpp's Q4_1 arithmetic greedily answers in French ("L'Étoile,
    # la Cité, ...", as llama-cpp-python's own create_chat_completion does); a system turn of our own does not.
    question = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    reply = api.chat.completions.create(model=GGUF_MODEL, messages=question, max_tokens=24, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage is not None
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 24
    chunks = list(
        api.chat.completions.create(model=GGUF_MODEL, messages=question, max_tokens=24, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    stopped = api.chat.completions.create(
        model=GGUF_MODEL, messages=question, max_tokens=24, temperature=0, stop=["Paris"]
    )
    assert "Paris" not in (stopped.choices[0].message.content or "")
