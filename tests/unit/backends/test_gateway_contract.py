"""The gateway over any replica: /v1/models shows each model's backend; usage comes from Finished."""

from collections.abc import AsyncIterator

import openai
from fastapi.testclient import TestClient

from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.protocol import Accepted, Finished, GenerateEvent, GenerateRequest, PipelineInfo, TextDelta


class LateUsageBackend:
    """Like a proxy: the prompt's tokens are known only when the upstream finishes."""

    def models(self) -> list[str]:
        return ["px", "local"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        yield Accepted(0)
        yield TextDelta("Paris", 1)
        yield Finished("stop", 17, 1)

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r", "n", "remote", 1, 0, (), extra={"backend": "proxy"})


def client() -> openai.OpenAI:
    cards = [ModelCard("px", "openai", None, "proxy"), ModelCard("local", "solanalm", 512)]
    http = TestClient(create_gateway_app(Gateway(LateUsageBackend(), cards)))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def test_every_replica_class_implements_the_contract() -> None:
    from serve_apps.backends.llamacpp import LlamaCppServer
    from serve_apps.backends.protocol import ModelReplica
    from serve_apps.backends.proxy.server import ProxyServer
    from serve_apps.backends.vllm_server import VllmServer
    from serve_apps.server.pipeline_server import PipelineServer

    for replica in (PipelineServer, LlamaCppServer, VllmServer, ProxyServer):
        assert issubclass(replica, ModelReplica), replica
    assert not issubclass(LateUsageBackend, ModelReplica)  # a gateway backend, not a replica


def test_models_list_backend_and_owner() -> None:
    models = {m.id: m for m in client().models.list().data}
    assert (models["px"].owned_by, models["px"].backend) == ("openai", "proxy")  # type: ignore[attr-defined]
    assert models["local"].backend == "transformers"  # type: ignore[attr-defined]


def test_usage_is_the_finished_events() -> None:
    api = client()
    reply = api.chat.completions.create(model="px", messages=[{"role": "user", "content": "hi"}])
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (17, 1)
    chunks = list(
        api.chat.completions.create(
            model="px",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.total_tokens) == (17, 18)
