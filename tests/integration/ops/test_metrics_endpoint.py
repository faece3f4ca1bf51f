"""Serving metrics on Ray's Prometheus endpoint after real requests through a deployed tiny-llama app."""

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import ray
from ray import serve

from cluster.deploy import deploy, read_serve_config, settings_for
from tests.integration.ops.prometheus import Scrape, wait_for

MODEL = "tiny-llama"
SLOTS = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(ray_cluster: None, repo_root: Path, model_cache_dir: Path) -> Iterator[str]:
    """configs/serve.yaml's builder: tiny-llama in one stage, JSON logs, payments off (their metrics: unit tests)."""
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    settings = settings_for(
        app,
        {
            "model": {
                "served": [MODEL],
                "cache_dir": str(model_cache_dir),
                "catalogue": str(repo_root / "configs" / "models.yaml"),
            },
            "pipeline": {"num_stages": 1, "max_num_seqs": SLOTS, "max_queue": 8},
            "http": {"port": _free_port()},
            "payments": {"enabled": False},
            "logging": {"format": "json", "level": "INFO"},
        },
    )
    deploy(app, settings)
    yield f"http://127.0.0.1:{settings.http.port}/v1"
    serve.shutdown()


def _served(scrape: Scrape) -> bool:
    return (
        scrape.total("ray_solanalm_requests_total", model=MODEL, status="ok") >= 2
        and scrape.total("ray_solanalm_requests_total", model="unknown", status="404") >= 1
        and scrape.total("ray_solanalm_time_per_output_token_seconds_count", model=MODEL) >= 1
        and scrape.total("ray_solanalm_stage_forward_seconds_count", model=MODEL, stage="0") >= 10
        and scrape.total("ray_solanalm_engine_steps_total", model=MODEL) >= 10
        # The step counter is sampled by a periodic task: wait for this replica's own (deployment-tagged)
        # series, not only for series an earlier module's replicas left in the metrics agent.
        and scrape.total("ray_solanalm_engine_steps_total", model=MODEL, deployment=f"pipeline-{MODEL}") >= 2
        and bool(scrape.values("ray_solanalm_kv_slots_total", model=MODEL))
    )


def test_requests_tokens_latencies_and_engine_gauges_are_exported(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="open", max_retries=0, timeout=120)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    stream = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    streamed = sum(1 for _ in stream)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert chat.usage is not None and streamed > 0

    scrape = wait_for(_served)

    assert scrape.total("ray_solanalm_requests_total", model=MODEL, status="ok") >= 2
    assert scrape.total("ray_solanalm_requests_total", model="unknown", status="404") >= 1
    assert scrape.total("ray_solanalm_prompt_tokens_total", model=MODEL) >= chat.usage.prompt_tokens > 0
    assert scrape.total("ray_solanalm_completion_tokens_total", model=MODEL) >= chat.usage.completion_tokens + 5
    assert scrape.total("ray_solanalm_ttft_seconds_count", model=MODEL) >= 2
    assert 0 < scrape.total("ray_solanalm_ttft_seconds_sum", model=MODEL) < 120
    tpot_count = scrape.total("ray_solanalm_time_per_output_token_seconds_count", model=MODEL)
    assert 0 < scrape.total("ray_solanalm_time_per_output_token_seconds_sum", model=MODEL) / tpot_count < 30
    # Every step (a prefill and at least 5 decodes per request) runs through stage 0.
    assert scrape.total("ray_solanalm_stage_forward_seconds_count", model=MODEL, stage="0") >= 10
    assert scrape.total("ray_solanalm_engine_steps_total", model=MODEL) >= 10
    assert scrape.values("ray_solanalm_kv_slots_total", model=MODEL) == [SLOTS]
    assert all(0 <= value <= SLOTS for value in scrape.values("ray_solanalm_kv_slots_used", model=MODEL))
    assert scrape.values("ray_solanalm_queue_depth", model=MODEL)
    # Inside a Serve replica the serving metrics carry Serve's deployment tag.
    assert scrape.total("ray_solanalm_engine_steps_total", model=MODEL, deployment=f"pipeline-{MODEL}") >= 2


def _json_lines_with(text: str) -> list[dict]:
    """JSON log lines of this session's Ray logs (Ray copies each worker's stderr there) containing `text`."""
    node = ray._private.worker._global_node  # the session's head: its logs directory
    assert node is not None
    logs = Path(node.get_logs_dir_path())
    found = []
    for path in logs.rglob("*"):
        if not path.is_file() or path.suffix not in (".err", ".out", ".log"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            if text in line and line.lstrip().startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    found.append(json.loads(line))
    return found


def test_gateway_logs_are_json_with_the_request_id(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="open", max_retries=0, timeout=120)
    reply = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    deadline = time.monotonic() + 20
    lines = _json_lines_with(reply.id)
    while not lines and time.monotonic() < deadline:
        time.sleep(0.5)
        lines = _json_lines_with(reply.id)
    access = [line for line in lines if line.get("logger") == "serve_apps.metrics"]
    assert access, f"no JSON access line for {reply.id}"
    assert access[0]["request_id"] == reply.id and access[0]["message"] == "request ok"
    assert access[0]["completion_tokens"] == 3 and access[0]["level"] == "INFO"
