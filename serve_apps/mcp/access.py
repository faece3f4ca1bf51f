"""How the MCP tools reach a gateway: over HTTP with an API key (stdio server) or in-process (mounted).

Both answer the same four calls; errors become `GatewayCallError` with the gateway's own message, which
the MCP server turns into a tool error (never a traceback).
"""

import json
from collections.abc import Callable
from typing import Any, Protocol

import httpx
from fastapi import Request
from pydantic import ValidationError

from serve_apps.gateway.errors import OpenAIError
from serve_apps.gateway.openai_protocol import ChatCompletionRequest


class GatewayCallError(RuntimeError):
    """The gateway refused or failed a call; `status` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class GatewayAccess(Protocol):
    async def chat(self, body: dict[str, Any], authorization: str | None) -> dict[str, Any]: ...
    async def models(self) -> dict[str, Any]: ...
    async def nodes(self) -> dict[str, Any]: ...
    async def performance(self) -> dict[str, Any]: ...


class HttpGatewayAccess:
    """A gateway at `base_url` (http://host:port/v1), every call with the same API key."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _headers(self, authorization: str | None = None) -> dict[str, str]:
        if authorization:
            return {"Authorization": authorization}
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.request(method, url, json=body, headers=self._headers())
        except httpx.HTTPError as exc:
            raise GatewayCallError(503, f"cannot reach the gateway at {self.base_url}: {exc}") from exc
        try:
            payload = response.json()
        except json.JSONDecodeError:
            payload = {"error": {"message": response.text[:500]}}
        if response.status_code >= 400 and not url.endswith("/healthz"):
            message = (payload.get("error") or {}).get("message") if isinstance(payload, dict) else None
            raise GatewayCallError(response.status_code, str(message or response.text[:500]))
        return payload if isinstance(payload, dict) else {"data": payload}

    async def chat(self, body: dict[str, Any], authorization: str | None) -> dict[str, Any]:
        return await self._call("POST", self.base_url + "/chat/completions", body)

    async def models(self) -> dict[str, Any]:
        return await self._call("GET", self.base_url + "/models")

    async def nodes(self) -> dict[str, Any]:
        return await self._call("GET", self.base_url + "/network/nodes")

    async def performance(self) -> dict[str, Any]:
        root = self.base_url.removesuffix("/v1")
        return await self._call("GET", root + "/healthz")


class InProcessGatewayAccess:
    """The gateway this app serves: inference goes through the same route code as /v1/chat/completions
    (per-wallet rate limit, hold, settlement; the per-address limit is the app's middleware, before /mcp),
    so a paid deployment charges a tool call like any request; nodes and performance are the public views."""

    def __init__(self, core: Callable[[], Any]) -> None:
        self._core = core  # () -> Gateway (the app's current gateway, set when the Serve replica starts)

    async def chat(self, body: dict[str, Any], authorization: str | None) -> dict[str, Any]:
        from serve_apps.gateway.app import _respond  # the route's own path; imported late (app imports us)

        gateway = self._gateway()
        try:
            request = ChatCompletionRequest.model_validate({**body, "stream": False})
        except ValidationError as exc:
            raise GatewayCallError(400, f"invalid request: {exc.errors()[0].get('msg')}") from None
        try:
            response = await _respond(gateway, request, True, authorization)
        except OpenAIError as exc:
            raise GatewayCallError(exc.status, exc.message) from None
        return dict(json.loads(bytes(response.body)))

    async def models(self) -> dict[str, Any]:
        return dict(self._gateway().list_models())

    async def nodes(self) -> dict[str, Any]:
        from serve_apps.gateway.providers import public_nodes

        source = self._gateway().network_nodes
        if source is None:
            raise GatewayCallError(503, "this gateway has no provider registry")
        try:
            return {"object": "list", "data": public_nodes(await source())}  # the public fields, as /v1
        except LookupError as exc:
            raise GatewayCallError(503, str(exc)) from None

    async def performance(self) -> dict[str, Any]:
        from serve_apps.gateway.app import _health

        # The public view of /healthz; stages, queues and errors are the operator's (/healthz?detail=1).
        response = await _health(self._gateway())
        return dict(json.loads(bytes(response.body)))

    def _gateway(self) -> Any:
        gateway = self._core()
        if gateway is None:
            raise GatewayCallError(503, "gateway is starting")
        return gateway


def authorization_of(request: Request | None) -> str | None:
    """The Authorization header of the HTTP request an MCP message came in (None over stdio)."""
    if request is None:
        return None
    return request.headers.get("authorization")
