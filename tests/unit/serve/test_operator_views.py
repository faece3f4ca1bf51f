"""Anyone may ask a gateway whether it is alive and which providers exist; only the operator (its token)
sees the pids, node ids, endpoints and exception text behind that answer."""

from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from serve_apps.engine.messages import StageInfo
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.protocol import PipelineInfo

TOKEN = "op-token-0123456789abcdef"
STAGE = StageInfo(0, 0, 6, True, True, 10, 40, 1 << 20, 1 << 19, 4242, "node-abc123", "stage-0", 1, 8, 512)
NODES = [
    {
        "node_id": "provider-9f",
        "wallet": "W1",
        "region": "eu",
        "kind": "provider",
        "endpoint": "10.1.2.3:7443",
        "cert_pem": "-----BEGIN CERTIFICATE-----",
        "labels": {"host": "box-7"},
        "models": ["tiny-llama"],
        "health": "alive",
        "reputation": 0.7,
        "link_token": "secret",
    }
]


class Backend:
    """'good' describes a 1-stage pipeline; 'broken' fails with an exception naming an internal path."""

    def models(self) -> list[str]:
        return ["good", "broken"]

    async def stream(self, request: Any) -> Any:
        raise NotImplementedError

    async def describe(self, model: str) -> PipelineInfo:
        if model == "broken":
            raise RuntimeError("actor stage-1 at /home/op/.cache/weights died on node-def456")
        return PipelineInfo(model, "replica-7", "node-abc123", "float32", 6, 512, (STAGE,), queue_depth=2)


@pytest.fixture()
def http() -> TestClient:
    async def nodes() -> list[dict[str, Any]]:
        return NODES

    gateway = Gateway(Backend(), [ModelCard("good", "t"), ModelCard("broken", "t")], network_nodes=nodes)  # type: ignore[arg-type]
    gateway.operator_token = SecretStr(TOKEN)
    return TestClient(create_gateway_app(gateway))


def as_operator(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_anonymous_health_is_liveness_only(http: TestClient) -> None:
    response = http.get("/healthz")
    assert response.status_code == 503  # one pipeline is down: degraded
    assert response.json() == {
        "status": "degraded",
        "pipelines": [{"model": "good", "status": "ok"}, {"model": "broken", "status": "unavailable"}],
    }
    for leak in ("4242", "node-abc123", "replica-7", "stage-1", "/home/op", "RuntimeError", "pid", "busy_s"):
        assert leak not in response.text


def test_the_operator_sees_the_detail(http: TestClient) -> None:
    body = http.get("/healthz?detail=1", headers=as_operator()).json()
    good, broken = body["pipelines"]
    assert good["replica"] == "replica-7" and good["stages"][0]["pid"] == 4242
    assert good["stages"][0]["node_id"] == "node-abc123" and "busy_s" in good["stages"][0]
    assert "died on node-def456" in broken["error"]


@pytest.mark.parametrize("headers", [{}, as_operator("wrong"), {"Authorization": TOKEN}, as_operator("")])
def test_the_detail_without_the_token_is_401(http: TestClient, headers: dict[str, str]) -> None:
    for path in ("/healthz?detail=1", "/v1/network/nodes?detail=1"):
        response = http.get(path, headers=headers)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_operator_token"
        assert "4242" not in response.text and "10.1.2.3" not in response.text


def test_a_gateway_without_an_operator_token_shows_no_detail() -> None:
    gateway = Gateway(Backend(), [ModelCard("good", "t")])  # type: ignore[arg-type]
    http = TestClient(create_gateway_app(gateway))
    assert http.get("/healthz?detail=1", headers=as_operator()).status_code == 401
    assert "4242" not in http.get("/healthz").text


def test_public_provider_list_shows_who_and_what_not_where(http: TestClient) -> None:
    public = http.get("/v1/network/nodes")
    assert public.json()["data"] == [
        {
            "wallet": "W1",
            "kind": "provider",
            "region": "eu",
            "models": ["tiny-llama"],
            "health": "alive",
            "reputation": 0.7,
        }
    ]
    for leak in ("provider-9f", "10.1.2.3", "CERTIFICATE", "box-7", "secret"):
        assert leak not in public.text
    detail = http.get("/v1/network/nodes?detail=1", headers=as_operator())
    (node,) = detail.json()["data"]
    assert (node["node_id"], node["endpoint"], node["labels"]) == ("provider-9f", "10.1.2.3:7443", {"host": "box-7"})
    assert "link_token" not in node  # secrets are never shown, not even to the operator
