"""Reject oversized bodies before they are read or parsed (ASGI middleware)."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_apps.gateway.current import current_max_body_bytes
from serve_apps.gateway.errors import error_body


class BodySizeLimit:
    """413 in OpenAI error format when Content-Length (or the bytes actually received) exceed max_bytes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = current_max_body_bytes() or self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await _reject(send, max_bytes)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _reject(send, max_bytes)


class _TooLarge(Exception):
    pass


async def _reject(send: Send, max_bytes: int) -> None:
    import json

    body = json.dumps(error_body(413, f"request body exceeds {max_bytes} bytes", code="body_too_large")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
