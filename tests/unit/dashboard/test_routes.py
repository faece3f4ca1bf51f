"""The dashboard's routes in-process over a fake backend: pages render, static files are the shipped ones
only, the money view and operator actions need the operator's session and a CSRF token, a client's view
needs a key."""

import re
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serve_apps.dashboard import live
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.protocol import Accepted, Finished, GenerateEvent, GenerateRequest, PipelineInfo, StageInfo, TextDelta

TOKEN = "operator-secret-token"


class FakeBackend:
    def models(self) -> list[str]:
        return ["fake"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        yield Accepted(prompt_tokens=5)
        yield TextDelta("hello", 1)
        yield TextDelta(" world", 2)
        yield Finished("stop", 5, 2)

    async def describe(self, model: str) -> PipelineInfo:
        stages = (stage(0, 0, 4, "node-a"), stage(1, 4, 6, "node-b"))
        return PipelineInfo(model, "r1", "n1", "float32", 6, 512, stages, queue_depth=3, running=2, steps=40)


def stage(index: int, start: int, end: int, node: str) -> StageInfo:
    return StageInfo(
        index, start, end, index == 0, end == 6, 10, 40, 1 << 20, 1 << 19, 100 + index, node, f"s{index}", 1, 8, 4096
    )


@pytest.fixture()
def http() -> TestClient:
    gateway = Gateway(FakeBackend(), [ModelCard("fake", "tests")], operator_token=SecretStr(TOKEN))
    return TestClient(create_gateway_app(gateway))


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def test_pages_render_with_a_csp_and_no_inline_script(http: TestClient) -> None:
    for path in ("/dashboard", "/dashboard/network", "/dashboard/money", "/dashboard/training", "/dashboard/me"):
        response = http.get(path)
        assert response.status_code == 200, path
        assert "script-src" not in response.headers["content-security-policy"]  # default-src 'self' covers it
        scripts = re.findall(r"<script(?![^>]*\bsrc=)([^>]*)>", response.text)
        assert all('type="application/json"' in attrs for attrs in scripts), (path, scripts)


def test_live_page_shows_pipeline_queue_and_the_network_draws_layer_bars(http: TestClient) -> None:
    live = http.get("/dashboard").text
    assert '<td class="queue">3</td>' in live and '<td class="kv">2 / 8</td>' in live
    network = http.get("/dashboard/network").text
    assert network.count('class="stage s') == 2 and "stage 1: 4–5" in network
    assert "no provider registry" in network  # this gateway has none: the empty state, not an error
    assert "node-a" not in network  # node ids are the operator's (as in /v1/network/nodes)
    http.post("/dashboard/operator/login", data={"token": TOKEN})
    assert "node-a" in http.get("/dashboard/network").text


def test_completed_requests_show_in_the_live_figures(http: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(3):
        http.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
    monkeypatch.setattr(live.FEED, "_at", 0.0)  # the next read ticks now, not a second after the last test's
    figures = http.get("/dashboard/api/live").json()["models"]["fake"]
    assert figures["requests_total"] >= 3 and figures["tokens_total"] >= 6


def test_static_serves_only_shipped_files(http: TestClient) -> None:
    assert http.get("/dashboard/static/vendor/htmx.min.js").status_code == 200
    bad_paths = ("/dashboard/static/../routes.py", "/dashboard/static/vendor/x.js", "/dashboard/static/%2e%2e/views.py")
    for bad in bad_paths:
        response = http.get(bad)
        assert response.status_code == 404 and response.json()["error"]["code"] in {"not_found", None}, bad


def test_money_and_actions_are_the_operators(http: TestClient) -> None:
    assert http.get("/dashboard/api/money").status_code == 401
    assert "operator token" in http.get("/dashboard/money").text
    assert http.post("/dashboard/actions/settle", data={"csrf": "x"}).status_code == 401
    wrong = http.post("/dashboard/operator/login", data={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_operator_token"
    login = http.post("/dashboard/operator/login", data={"token": TOKEN}, follow_redirects=False)
    assert login.status_code == 303
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
    # Signed in: an action without the page's CSRF token is refused; with it, it runs (no payments here: 503).
    forged = http.post("/dashboard/actions/settle", data={"csrf": "0" * 64})
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "csrf_failed"
    csrf = csrf_of(http.get("/dashboard/network").text)
    assert http.post("/dashboard/actions/settle", data={"csrf": csrf}).status_code == 503
    # Re-plan: CSRF first, then only a served model (the registry call itself is the integration test's).
    assert http.post("/dashboard/actions/replan", data={"csrf": "0" * 64, "model": "fake"}).status_code == 403
    unknown = http.post("/dashboard/actions/replan", data={"csrf": csrf, "model": "other"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert http.get("/dashboard/api/money", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_client_view_needs_a_key(http: TestClient) -> None:
    response = http.get("/dashboard/api/me", headers={"Authorization": "Bearer sk-someone-else"})
    assert response.status_code == 401 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "Payments are disabled" in http.get("/dashboard/me").text
