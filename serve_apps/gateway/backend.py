"""How the gateway reaches pipelines: Serve deployment handles in production, in-process servers in tests."""

from collections.abc import AsyncIterator
from typing import Protocol

from serve_apps.protocol import Embedded, EmbedRequest, GenerateEvent, GenerateRequest, PipelineInfo, Rejected


class PipelineLost(RuntimeError):
    """The replica serving a request died (process killed, node gone); the request may be retried."""


class PipelineBackend(Protocol):
    """The gateway's view of the model pipelines it routes to."""

    def models(self) -> list[str]: ...

    def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]: ...

    async def embed(self, request: EmbedRequest) -> Embedded | Rejected: ...

    async def describe(self, model: str) -> PipelineInfo: ...


class ServeHandleBackend:
    """Routes to one Ray Serve deployment (of PipelineServer) per model."""

    def __init__(self, handles: dict) -> None:  # dict[str, ray.serve.handle.DeploymentHandle]
        self._handles = handles
        self._streaming = {name: handle.options(stream=True) for name, handle in handles.items()}

    def models(self) -> list[str]:
        return list(self._handles)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        from ray.exceptions import RayActorError

        try:
            async for event in self._streaming[request.model].generate.remote(request):
                yield event
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError: the replica is gone
            raise PipelineLost(str(exc)) from exc

    async def embed(self, request: EmbedRequest) -> Embedded | Rejected:
        from ray.exceptions import RayActorError

        try:
            return await self._handles[request.model].embed.remote(request)
        except RayActorError as exc:
            raise PipelineLost(str(exc)) from exc

    async def describe(self, model: str) -> PipelineInfo:
        return await self._handles[model].describe.remote()


class InProcessBackend:
    """Calls PipelineServer objects directly: the test seam beside ServeHandleBackend."""

    def __init__(self, servers: dict) -> None:  # dict[str, PipelineServer]
        self._servers = servers

    def models(self) -> list[str]:
        return list(self._servers)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        async for event in self._servers[request.model].generate(request):
            yield event

    async def embed(self, request: EmbedRequest) -> Embedded | Rejected:
        return await self._servers[request.model].embed(request)  # type: ignore[no-any-return]

    async def describe(self, model: str) -> PipelineInfo:
        return await self._servers[model].describe()
