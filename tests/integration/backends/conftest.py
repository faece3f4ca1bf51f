"""One Serve application for the backend tests, in front of a second SolanaLM instance as the upstream.

The upstream is a whole SolanaLM gateway (`create_gateway_app` over an in-process PipelineServer of
tiny-llama, one stage) served by uvicorn on a random port in a thread. The deployed application
serves proxies to it (plus one to a closed port and one to a model the upstream lacks) and, when
llama-cpp-python is importable, the SmolLM2 GGUF on llama.cpp.
"""

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
import uvicorn
import yaml
from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.config import Settings
from cluster.deploy import deploy, read_serve_config, settings_for
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.backend import InProcessBackend
from serve_apps.server.pipeline_server import PipelineServer

UPSTREAM_KEY_ENV = "SOLANALM_TEST_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-upstream-test-0123456789"
PROXY_WALLET = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"
GGUF_MODEL = "smollm2-135m-instruct-gguf"
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Recorder:
    """ASGI middleware recording each upstream request's path and Authorization header."""

    app: ASGIApp
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization")
            self.seen.append((scope["path"], auth.decode() if auth else None))
        await self.app(scope, receive, send)

    def completions(self) -> int:
        return sum(1 for path, _ in self.seen if path.endswith("/completions"))


@dataclass(frozen=True)
class Upstream:
    base_url: str
    recorder: Recorder

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="direct", max_retries=0, timeout=60)


@pytest.fixture(scope="package")
def upstream(ray_cluster: None, repo_root: Path, model_cache_dir: Path) -> Iterator[Upstream]:
    """A second SolanaLM gateway serving tiny-llama, reachable over HTTP."""
    settings = Settings(
        model={"catalogue": repo_root / "configs/models.yaml", "served": ["tiny-llama"], "cache_dir": model_cache_dir},
        pipeline={"num_stages": 1, "max_num_seqs": 8},
    )
    server = PipelineServer("tiny-llama", settings)
    gateway = Gateway(InProcessBackend({"tiny-llama": server}), [ModelCard("tiny-llama", "solanalm", 512)])
    recorder = Recorder(create_gateway_app(gateway))
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(recorder, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.started, "the upstream gateway did not start"
    yield Upstream(f"http://127.0.0.1:{port}/v1", recorder)
    http.should_exit = True
    thread.join(timeout=10)
    if server.pool is not None:
        server.pool.kill()


@dataclass(frozen=True)
class Deployed:
    base_url: str
    settings: Settings

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="test", max_retries=0, timeout=120)


def proxy_entry(base_url: str, upstream_model: str = "tiny-llama", **options: object) -> dict:
    proxy = {"base_url": base_url, "upstream_model": upstream_model, "api_key_env": UPSTREAM_KEY_ENV, **options}
    return {"backend": "proxy", "owned_by": "upstream-operator", "max_model_len": 512, "proxy": proxy}


@pytest.fixture(scope="package")
def deployed(
    upstream: Upstream,
    repo_root: Path,
    model_cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    """The builder's application (as `solanalm up` deploys it) serving every non-sharded backend."""
    raw = yaml.safe_load((repo_root / "configs/models.yaml").read_text())
    raw["models"].update(
        {
            "tiny-proxy": proxy_entry(upstream.base_url, cache=True, commission_bps=300, wallet=PROXY_WALLET),
            "tiny-proxy-missing": proxy_entry(upstream.base_url, upstream_model="no-such-model"),
            "tiny-proxy-down": proxy_entry(f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=2),
        }
    )
    catalogue = tmp_path_factory.mktemp("catalogue") / "models.yaml"
    catalogue.write_text(yaml.safe_dump(raw))
    served = ["tiny-proxy", "tiny-proxy-missing", "tiny-proxy-down"] + ([GGUF_MODEL] if HAS_LLAMA_CPP else [])
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    settings = settings_for(
        app,
        {
            "model": {"served": served, "cache_dir": str(model_cache_dir), "catalogue": str(catalogue)},
            "http": {"port": free_port()},
            "payments": {
                "state_dir": str(tmp_path_factory.mktemp("payments")),
                "actor_name": "solanalm-payments-backends-test",
            },
        },
    )
    mp = pytest.MonkeyPatch()
    mp.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)  # the builder reads it; replicas get it as a SecretStr
    try:
        deploy(app, settings)
    finally:
        mp.undo()
    yield Deployed(f"http://127.0.0.1:{settings.http.port}/v1", settings)
    serve.shutdown()
