"""Graceful shutdown and redeploy: in-flight streams finish before their stages are torn down.

A package of its own: it deploys (and shuts down) its own Serve application, before the serving
package's shared application exists.
"""

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from ray import serve

from cluster.config import Settings
from cluster.deploy import deploy, drain_and_shutdown, read_serve_config, settings_for

TINY = "tiny-llama"
TOKENS = 160


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(repo_root: Path, cache: Path, port: int, payments_dir: Path, max_queue: int) -> Settings:
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    return settings_for(
        app,
        {
            "model": {
                "served": [TINY],
                "cache_dir": str(cache),
                "catalogue": str(repo_root / "configs" / "models.yaml"),
            },
            "pipeline": {"num_stages": 2, "max_num_seqs": 8, "max_queue": max_queue},
            "http": {"port": port},
            "payments": {"state_dir": str(payments_dir), "actor_name": "solanalm-payments-drain"},
        },
    )


@pytest.fixture(scope="module")
def app_settings(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path, int, Path]]:
    port = _free_port()
    payments_dir = tmp_path_factory.mktemp("payments-drain")
    deploy(
        read_serve_config(repo_root / "configs" / "serve.yaml"),
        _settings(repo_root, model_cache_dir, port, payments_dir, 64),
    )
    yield repo_root, model_cache_dir, port, payments_dir
    serve.shutdown()


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="drain", max_retries=0, timeout=120)


def _stream_while(port: int, action: Callable[[], object]) -> tuple[int, str | None]:
    """Stream TOKENS tokens; once the first text arrives, run `action` in a thread. (tokens, finish reason)."""
    stream = _client(port).completions.create(
        model=TINY,
        prompt="Drain me",
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    worker: threading.Thread | None = None
    tokens, reason = 0, None
    for chunk in stream:
        if worker is None and chunk.choices and chunk.choices[0].text:
            worker = threading.Thread(target=action)
            worker.start()
        if chunk.choices and chunk.choices[0].finish_reason:
            reason = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert worker is not None
    worker.join(timeout=300)
    return tokens, reason


def test_a_redeploy_lets_the_running_stream_finish(app_settings: tuple[Path, Path, int, Path]) -> None:
    repo_root, cache, port, payments_dir = app_settings
    changed = _settings(repo_root, cache, port, payments_dir, 32)  # new config version: Serve replaces the replica
    tokens, reason = _stream_while(
        port, lambda: deploy(read_serve_config(repo_root / "configs" / "serve.yaml"), changed)
    )
    assert (tokens, reason) == (TOKENS, "length")
    reply = _client(port).completions.create(model=TINY, prompt="After", max_tokens=4, temperature=0)
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_shutdown_drains_the_running_stream(app_settings: tuple[Path, Path, int, Path]) -> None:
    _repo_root, _cache, port, _payments_dir = app_settings
    tokens, reason = _stream_while(port, lambda: drain_and_shutdown("solanalm"))  # what `solanalm down` runs
    assert (tokens, reason) == (TOKENS, "length")
