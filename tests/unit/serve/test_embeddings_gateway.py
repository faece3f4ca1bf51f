"""/v1/embeddings in-process over a fake backend, driven by the official openai client."""

import base64
import struct

import openai
import pytest
from fastapi.testclient import TestClient

from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.protocol import Embedded, EmbedRequest, Rejected
from tests.unit.serve.test_gateway import FakeBackend

VECTOR = (0.6, 0.8, 0.0)


class EmbeddingBackend(FakeBackend):
    """FakeBackend with embeddings: each input's vector is VECTOR; a token id 666 is refused like a replica."""

    def __init__(self) -> None:
        super().__init__()
        self.embedded: list[EmbedRequest] = []

    def models(self) -> list[str]:
        return ["fake", "chat-only", "gguf"]

    async def embed(self, request: EmbedRequest) -> Embedded | Rejected:
        self.embedded.append(request)
        if any(isinstance(item, tuple) and 666 in item for item in request.inputs):
            return Rejected(400, "input 0 holds token ids outside [0, 512)", "input", "invalid_input")
        tokens = sum(len(item) if isinstance(item, tuple) else len(item.split()) for item in request.inputs)
        return Embedded(tuple(VECTOR for _ in request.inputs), tokens)


CARDS = [
    ModelCard("fake", "tests", embeddings=True),
    ModelCard("chat-only", "tests"),
    ModelCard("gguf", "tests", backend="llamacpp"),
]


@pytest.fixture()
def backend() -> EmbeddingBackend:
    return EmbeddingBackend()


@pytest.fixture()
def http(backend: EmbeddingBackend) -> TestClient:
    return TestClient(create_gateway_app(Gateway(backend, CARDS)))


@pytest.fixture()
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def test_openai_client_embeds_texts_and_token_ids(client: openai.OpenAI, backend: EmbeddingBackend) -> None:
    reply = client.embeddings.create(model="fake", input=["a b", "c"])  # the client asks for base64 itself
    assert [d.index for d in reply.data] == [0, 1]
    assert [pytest.approx(d.embedding) for d in reply.data] == [list(VECTOR)] * 2
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (3, 3)
    client.embeddings.create(model="fake", input=[[1, 2, 3], [4]], encoding_format="float")
    client.embeddings.create(model="fake", input=[5, 6])
    client.embeddings.create(model="fake", input="one text", dimensions=3)
    assert [r.inputs for r in backend.embedded] == [("a b", "c"), ((1, 2, 3), (4,)), ((5, 6),), ("one text",)]
    assert backend.embedded[-1].dimensions == 3


def test_base64_is_little_endian_float32(http: TestClient) -> None:
    body = http.post("/v1/embeddings", json={"model": "fake", "input": "x", "encoding_format": "base64"}).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert struct.unpack("<3f", raw) == pytest.approx(VECTOR)
    floats = http.post("/v1/embeddings", json={"model": "fake", "input": "x"}).json()
    assert floats["object"] == "list" and floats["model"] == "fake"
    assert floats["data"][0] == {"object": "embedding", "index": 0, "embedding": pytest.approx(list(VECTOR))}


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"model": "fake", "input": ""}, 400, "input"),
        ({"model": "fake", "input": []}, 400, "input"),
        ({"model": "fake", "input": [[]]}, 400, "input"),
        ({"model": "fake", "input": ["a", ""]}, 400, "input"),
        ({"model": "fake", "input": [-1]}, 400, "input"),
        ({"model": "fake", "input": [["a"]]}, 400, "input"),
        ({"model": "fake", "input": [1.5]}, 400, "input"),
        ({"model": "fake", "input": ["x"] * 2049}, 400, "input"),
        ({"model": "fake", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "fake", "input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"model": "fake", "input": "x", "dimensions": "3"}, 400, "dimensions"),
        ({"model": "fake", "input": "x", "bogus": 1}, 400, "bogus"),
        ({"input": "x"}, 400, "model"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": "chat-only", "input": "x"}, 400, "model"),
        ({"model": "fake", "input": [666]}, 400, "input"),  # refused by the replica
    ],
)
def test_bad_embedding_requests_are_openai_errors(http: TestClient, body: dict, status: int, param: str) -> None:
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"].startswith(param)


def test_a_backend_without_embeddings_is_named(http: TestClient) -> None:
    error = http.post("/v1/embeddings", json={"model": "gguf", "input": "x"}).json()["error"]
    assert "llamacpp" in error["message"] and error["code"] == "model_not_embedding"


def test_a_lone_surrogate_is_a_400(http: TestClient) -> None:
    raw = '{"model": "fake", "input": ["\\ud800"]}'
    response = http.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("input")


def test_embeddings_are_held_and_settled_through_payments_like_chat() -> None:
    from serve_apps.gateway.metering import Metering
    from tests.unit.serve.test_metering import FakePayments

    payments = FakePayments()
    gateway = Gateway(EmbeddingBackend(), CARDS, metering=Metering(payments))
    http = TestClient(create_gateway_app(gateway))
    assert http.post("/v1/embeddings", json={"model": "fake", "input": "x"}).status_code == 401
    response = http.post(
        "/v1/embeddings", json={"model": "fake", "input": ["a b", "c d"]}, headers={"Authorization": "Bearer rich"}
    )
    assert response.status_code == 200
    assert response.headers["x-solanalm-settlement-id"] == response.json()["settlement_id"] == "set_1"
    hold, report = payments.holds[0], payments.reports[0]
    assert hold.max_tokens == 1 and hold.prompt_tokens >= 4  # a bound of the prompt tokens
    assert (report.payer, report.prompt_tokens, report.completion_tokens) == ("wallet-rich", 4, 0)
    refused = http.post(
        "/v1/embeddings", json={"model": "fake", "input": [666]}, headers={"Authorization": "Bearer rich"}
    )
    assert refused.status_code == 400 and len(payments.released) == 1 and len(payments.reports) == 1  # not charged
    poor = http.post("/v1/embeddings", json={"model": "fake", "input": "x"}, headers={"Authorization": "Bearer poor"})
    assert poor.status_code == 402


def test_the_catalogue_marks_embeddings_on_the_pipeline_backend_only(repo_root) -> None:  # type: ignore[no-untyped-def]
    from cluster.models.catalogue import ModelSpec, load_catalogue

    catalogue = load_catalogue(repo_root / "configs" / "models.yaml")
    assert catalogue.get("smollm2-135m-instruct").embeddings and catalogue.get("tiny-llama").embeddings
    assert not catalogue.get("smollm2-135m-instruct-gguf").embeddings
    source = {"kind": "gguf", "path": "/x.gguf"}
    with pytest.raises(ValueError, match="transformers backend only"):
        ModelSpec(name="m", backend="llamacpp", source=source, embeddings=True)
