"""The MCP server over streamable HTTP at /mcp on the gateway's FastAPI app, behind the same API keys.

Stateless JSON mode: every POST is self-contained, so any gateway replica answers any message (no sticky
sessions under Ray Serve). The SDK's session manager needs its task group running; Serve does not run a
mounted app's lifespan, so it is started on the first request and lives as long as the replica. With
payments on, a request without a valid key (`Authorization: Bearer sk-...`) is refused with 401 before
the SDK sees it; the tool's inference then goes through the gateway's metering with that key.
"""

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from serve_apps.gateway.errors import OpenAIError, error_body
from serve_apps.mcp.access import InProcessGatewayAccess
from serve_apps.mcp.jobs import JobsConfig, TrainingJobs
from serve_apps.mcp.server import build_mcp_server

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]  # the job's working directory: this checkout


class McpEndpoint:
    """ASGI app: authenticate, then hand the request to the SDK's session manager."""

    def __init__(self, core: Callable[[], Any]) -> None:
        self._core = core
        # Built in the replica on first use: Serve pickles the app, and the SDK's server holds a cipher.
        self._manager: StreamableHTTPSessionManager | None = None
        self._started: asyncio.Future[None] | None = None

    def _build(self) -> StreamableHTTPSessionManager:
        server = build_mcp_server(InProcessGatewayAccess(self._core), replica_jobs())
        # DNS-rebinding protection is for cookie-less local servers reached from a browser; this endpoint
        # is the gateway's public API (any Host), authenticated by bearer keys in paid mode.
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        return StreamableHTTPSessionManager(
            server._lowlevel_server, json_response=True, stateless=True, security_settings=security
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = await self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        manager = await self._ensure_running()
        await manager.handle_request(scope, receive, send)

    async def _refusal(self, scope: Scope) -> JSONResponse | None:
        gateway = self._core()
        if gateway is None:
            return JSONResponse(error_body(503, "gateway is starting", code="starting"), status_code=503)
        if not gateway.metering.enabled:
            return None  # open mode: no keys, as /v1/chat/completions
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        try:
            await gateway.metering.authenticate(headers.get("authorization"))
        except OpenAIError as exc:
            body = error_body(exc.status, exc.message, code=exc.code)
            return JSONResponse(body, status_code=exc.status, headers={"WWW-Authenticate": "Bearer", **exc.headers})
        return None

    async def _ensure_running(self) -> StreamableHTTPSessionManager:
        if self._manager is None:
            self._manager = self._build()
            self._started = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._hold_open(self._manager, self._started))
        assert self._started is not None  # set with the manager (for mypy)
        await asyncio.shield(self._started)
        return self._manager

    async def _hold_open(self, manager: StreamableHTTPSessionManager, started: asyncio.Future[None]) -> None:
        async with manager.run():
            started.set_result(None)
            await asyncio.Event().wait()  # the replica's lifetime


def replica_jobs() -> TrainingJobs:
    """Jobs from inside the cluster: the job server of the cluster this replica runs in (if it has one)."""
    from cluster.config.training import TrainingSection

    def address() -> str | None:
        env = os.environ.get("RAY_ADDRESS", "")
        if env.startswith("http"):
            return env
        import ray

        url = ray._private.worker.get_dashboard_url() if ray.is_initialized() else None
        return None if not url else (url if url.startswith("http") else f"http://{url}")

    return TrainingJobs(JobsConfig(address, REPO_ROOT, TrainingSection().output_dir))


def mount_mcp(app: FastAPI, core: Callable[[], Any]) -> None:
    """Serve MCP at /mcp on `app` (POST messages; GET/DELETE answer 405 in stateless mode)."""
    endpoint = McpEndpoint(core)
    app.router.routes.append(Route("/mcp", endpoint=endpoint, methods=["GET", "POST", "DELETE"]))
