"""Serving metrics recorded by the real gateway app (in-process, official openai client) over a fake backend."""

from collections.abc import AsyncIterator
from types import SimpleNamespace

import openai
import pytest
from fastapi.testclient import TestClient

from cluster.observability.metrics import MetricSet
from payments import metrics as payments_metrics
from payments.protocol import BatchReport
from serve_apps import metrics as serve_metrics
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.protocol import Accepted, Finished, GenerateEvent, GenerateRequest, PipelineInfo, Rejected, TextDelta
from tests.unit.ops.fakes import FakeFlavour
from train_jobs import metrics as train_metrics

M = serve_metrics


class ThreeTokenBackend:
    """Answers three tokens; 'overload' is rejected with 503, 'fail' fails after it was accepted."""

    def models(self) -> list[str]:
        return ["fake"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        text = request.prompt or (request.messages or ())[-1].content
        if "overload" in text:
            yield Rejected(503, "busy", code="overloaded", retry_after_s=1)
            return
        yield Accepted(prompt_tokens=7)
        for i, piece in enumerate(("a", "b", "c"), start=1):
            yield TextDelta(piece, i)
        yield Finished("error" if "fail" in text else "length", 7, 3, error="boom" if "fail" in text else None)

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r1", "n1", "float32", 6, 512, ())


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeFlavour:
    flavour = FakeFlavour()
    monkeypatch.setattr(serve_metrics, "METRICS", MetricSet(serve_metrics.SPECS, flavour))
    return flavour


@pytest.fixture()
def client() -> openai.OpenAI:
    http = TestClient(create_gateway_app(Gateway(ThreeTokenBackend(), [ModelCard("fake", "tests")])))
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)


def _requests(fake: FakeFlavour) -> list[tuple[str, str]]:
    return [(tags["model"], tags["status"]) for tags in fake.tags(M.REQUESTS)]


def test_a_finished_request_records_count_tokens_ttft_and_tpot(fake: FakeFlavour, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert _requests(fake) == [("fake", "ok")]
    assert fake.values(M.PROMPT_TOKENS, "inc") == [7]
    assert fake.values(M.COMPLETION_TOKENS, "inc") == [3]
    (ttft,) = fake.values(M.TTFT, "observe")
    (tpot,) = fake.values(M.TPOT, "observe")
    assert 0 < ttft < 5 and 0 <= tpot < 5


def test_a_stream_is_counted_once_when_it_finishes(fake: FakeFlavour, client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="fake", prompt="hi", stream=True))
    assert chunks
    assert _requests(fake) == [("fake", "ok")]
    assert fake.values(M.COMPLETION_TOKENS, "inc") == [3]


def test_rejections_are_counted_by_status_and_unknown_models_share_one_label(
    fake: FakeFlavour, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model="fake", prompt="overload")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="made-up-model-name", prompt="hi")
    assert _requests(fake) == [("fake", "503"), ("unknown", "404")]
    assert fake.values(M.TTFT, "observe") == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_after_acceptance_is_one_error(fake: FakeFlavour, client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.APIError):  # a stream ends with an error event, a whole answer is a 503
        if stream:
            list(client.completions.create(model="fake", prompt="fail", stream=True))
        else:
            client.completions.create(model="fake", prompt="fail")
    assert _requests(fake) == [("fake", "error")]
    assert fake.values(M.COMPLETION_TOKENS, "inc") == []  # not charged, not counted as generated


def test_engine_gauges_sample_queue_running_slots_and_step_deltas(fake: FakeFlavour) -> None:
    scheduler = SimpleNamespace(num_waiting=3, running={"a": 1, "b": 2}, limits=SimpleNamespace(num_slots=8))
    engine = SimpleNamespace(scheduler=scheduler, steps=10)
    gauges = M.EngineGauges("m", engine)
    gauges.sample()
    engine.steps = 15
    gauges.sample()
    assert fake.values(M.QUEUE_DEPTH, "set") == [3, 3]
    assert fake.values(M.RUNNING, "set") == [2, 2]
    assert fake.values(M.KV_USED, "set") == [2, 2]
    assert fake.values(M.KV_TOTAL, "set") == [8, 8]
    assert fake.values(M.ENGINE_STEPS, "inc") == [10, 5]


def test_verification_failures_and_stage_labels(fake: FakeFlavour) -> None:
    M.record_verification_failure("m", "Wallet111")
    M.record_stage_forward("m", 2, 0.01)
    assert fake.tags(M.VERIFICATION_FAILURES) == [{"model": "m", "provider_wallet": "Wallet111"}]
    assert fake.tags(M.STAGE_FORWARD) == [{"model": "m", "stage": "2"}]
    assert M.stage_model_label("stage:tiny-llama:abc123:1:3-6", "/cache/x") == "tiny-llama"
    assert M.stage_model_label("", "/cache/tiny-llama-float32/") == "tiny-llama-float32"


def test_settle_pass_and_federated_round_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeFlavour()
    monkeypatch.setattr(payments_metrics, "METRICS", MetricSet(payments_metrics.SPECS, fake))
    monkeypatch.setattr(train_metrics, "METRICS", MetricSet(train_metrics.SPECS, fake))
    payments_metrics.record_settle_pass(BatchReport(2, 5, 12_345, 1, 0), unpaid_base_units=99)
    train_metrics.record_round("fl-job", 3.5, 1.25, dropped=1)
    assert fake.values(payments_metrics.BATCHES_CONFIRMED, "inc") == [2]
    assert fake.values(payments_metrics.PAYOUTS_CONFIRMED, "inc") == [5]
    assert fake.values(payments_metrics.LAMPORTS_PAID, "inc") == [12_345]
    assert fake.values(payments_metrics.BATCHES_PENDING, "set") == [1]
    assert fake.values(payments_metrics.UNPAID, "set") == [99]
    assert fake.values(train_metrics.ROUND_DURATION, "observe") == [3.5]
    assert fake.values(train_metrics.EPSILON, "set") == [1.25]
    assert fake.values(train_metrics.CLIENTS_DROPPED, "inc") == [1]
    assert fake.tags(train_metrics.ROUNDS) == [{"job": "fl-job"}]


def test_each_request_logs_one_json_access_line_with_its_request_id(
    fake: FakeFlavour, client: openai.OpenAI, restore_root: None
) -> None:
    import io
    import json
    import logging

    from cluster.config.observability import LoggingSection
    from cluster.observability.logs import JsonFormatter, configure_logging

    configure_logging(LoggingSection(format="json", level="INFO"))
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    reply = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (access,) = [line for line in lines if line["logger"] == "serve_apps.metrics"]
    assert access["message"] == "request ok" and access["request_id"] == reply.id
    assert access["completion_tokens"] == 3 and access["model"] == "fake" and access["ttft_s"] >= 0
