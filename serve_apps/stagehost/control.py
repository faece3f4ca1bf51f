"""The provider daemon's local control endpoint: `solanalm provider mode|status` talk to a running node here.

A unix socket in the provider's state directory (mode 0600, the directory 0700) and a token file beside it
(0600, fresh at every start): a caller must be this machine's user and present the token, compared in
constant time. One JSON object per line each way; a request is at most `MAX_REQUEST_BYTES`:

    {"token": "...", "op": "status"}                         -> {"ok": true, "status": {...}}
    {"token": "...", "op": "mode", "mode": "training"}       -> {"ok": true, "status": {...}}  (switch started)
    anything else                                            -> {"ok": false, "error": "..."}

It is the provider's own channel, not the operator's: nothing here is reachable from the network. (A
socketserver of the standard library: one small line protocol needs no HTTP stack.)
"""

import hmac
import json
import logging
import os
import secrets
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_apps.stagehost.modes import MODES, ModeController, ModeError

logger = logging.getLogger(__name__)
SOCKET_NAME, TOKEN_NAME = "control.sock", "control.token"
MAX_REQUEST_BYTES = 4096
CALL_TIMEOUT_S = 10.0


class ControlError(RuntimeError):
    """The control endpoint refused a request or cannot be reached."""


def handle_request(raw: bytes, token: str, controller: ModeController) -> dict[str, Any]:
    """One request line's answer (pure over the controller: every refusal is an answer, never a raise)."""
    if len(raw) > MAX_REQUEST_BYTES:
        return {"ok": False, "error": f"request over {MAX_REQUEST_BYTES} bytes"}
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {"ok": False, "error": "not a JSON object"}
    if not isinstance(request, dict):
        return {"ok": False, "error": "not a JSON object"}
    presented = request.get("token")
    if not isinstance(presented, str) or not hmac.compare_digest(presented.encode(), token.encode()):
        return {"ok": False, "error": "wrong or missing control token"}
    op = request.get("op")
    if op == "status":
        return {"ok": True, "status": controller.describe()}
    if op == "mode":
        mode = request.get("mode")
        if not isinstance(mode, str) or mode not in MODES:
            return {"ok": False, "error": f"mode must be one of {list(MODES)}"}
        try:
            controller.switch(mode)  # type: ignore[arg-type]  # checked against MODES above
        except ModeError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "status": controller.describe()}
    return {"ok": False, "error": "op must be 'status' or 'mode'"}


class ControlServer:
    """The unix-socket endpoint over a ModeController; `start()` writes the token file and listens."""

    def __init__(self, state_dir: Path, controller: ModeController) -> None:
        self.state_dir = state_dir.expanduser()
        self.controller = controller
        self.token = secrets.token_urlsafe(32)
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def socket_path(self) -> Path:
        return self.state_dir / SOCKET_NAME

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        token_path = self.state_dir / TOKEN_NAME
        token_path.unlink(missing_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.token)
        self.socket_path.unlink(missing_ok=True)
        token, controller = self.token, self.controller

        class Handler(socketserver.StreamRequestHandler):
            timeout = CALL_TIMEOUT_S

            def handle(self) -> None:
                try:
                    raw = self.rfile.readline(MAX_REQUEST_BYTES + 1)
                except OSError:
                    return
                answer = handle_request(raw.rstrip(b"\n"), token, controller)
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        old_umask = os.umask(0o177)  # the socket is created 0600
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.socket_path), Handler)
        finally:
            os.umask(old_umask)
        self._server.daemon_threads = True
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.05), name="provider-control", daemon=True
        )
        self._thread.start()
        logger.info("control endpoint on %s", self.socket_path)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self.socket_path.unlink(missing_ok=True)
        (self.state_dir / TOKEN_NAME).unlink(missing_ok=True)


def call(state_dir: Path, op: str, timeout_s: float = CALL_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
    """Send one request to the node whose state directory is `state_dir`; its `status` (ControlError when
    refused or unreachable)."""
    state = state_dir.expanduser()
    try:
        token = (state / TOKEN_NAME).read_text().strip()
    except OSError as exc:
        raise ControlError(f"no running provider node here ({state / TOKEN_NAME}: {exc.strerror})") from exc
    line = json.dumps({"token": token, "op": op, **fields}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(state / SOCKET_NAME))
            sock.sendall(line)
            answer = _read_line(sock.recv)
    except OSError as exc:
        raise ControlError(f"the provider node at {state} does not answer: {exc}") from exc
    try:
        reply = json.loads(answer)
    except ValueError as exc:
        raise ControlError("the provider node answered no JSON") from exc
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    status: dict[str, Any] = reply["status"]
    return status


def _read_line(recv: Callable[[int], bytes], limit: int = 1 << 20) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)
