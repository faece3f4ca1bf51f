"""A small local HTTP server that answers like Grafana's HTTP API and records every request (a test seam)."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class GrafanaState:
    calls: list[Call] = field(default_factory=list)
    datasources: dict[str, dict] = field(default_factory=dict)
    folders: dict[str, dict] = field(default_factory=dict)
    dashboards: dict[str, dict] = field(default_factory=dict)
    token: str = "secret-token"

    def paths(self, method: str) -> list[str]:
        return [call.path for call in self.calls if call.method == method]


def _handler(state: GrafanaState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            auth = self.headers.get("Authorization")
            state.calls.append(Call(method, self.path, auth, body))
            if auth != f"Bearer {state.token}":
                return self._answer(401, {"message": "Unauthorized"})
            self._route(method, self.path, body)

        def _route(self, method: str, path: str, body: Any) -> None:
            if method == "GET" and path.startswith("/api/datasources/uid/"):
                uid = path.rsplit("/", 1)[1]
                found = state.datasources.get(uid)
                return self._answer(200, found) if found else self._answer(404, {"message": "Data source not found"})
            if method == "POST" and path == "/api/datasources":
                state.datasources[body["uid"]] = body
                return self._answer(200, {"datasource": body, "message": "Datasource added"})
            if method == "PUT" and path.startswith("/api/datasources/uid/"):
                state.datasources[path.rsplit("/", 1)[1]] = body
                return self._answer(200, {"message": "Datasource updated"})
            if method == "GET" and path.startswith("/api/folders/"):
                uid = path.rsplit("/", 1)[1]
                found = state.folders.get(uid)
                return self._answer(200, found) if found else self._answer(404, {"message": "folder not found"})
            if method == "POST" and path == "/api/folders":
                state.folders[body["uid"]] = body
                return self._answer(200, body)
            if method == "POST" and path == "/api/dashboards/db":
                uid = body["dashboard"]["uid"]
                state.dashboards[uid] = body
                return self._answer(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x", "version": 1})
            return self._answer(404, {"message": "Not found"})

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._handle("PUT")

    return Handler


@contextmanager
def fake_grafana() -> Iterator[tuple[str, GrafanaState]]:
    state = GrafanaState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
