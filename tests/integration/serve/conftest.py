"""One Serve application for the serving integration tests: tiny Llama and SmolLM2 (fp32), 3 stages each."""

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from ray import serve

from cluster.config import Settings
from cluster.deploy import deploy, read_serve_config, settings_for

MODELS = ["tiny-llama", "smollm2-135m-instruct-fp32"]
STAGES = 3


@dataclass(frozen=True)
class ServedApp:
    base_url: str
    settings: Settings

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="test", max_retries=0, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Package scope: the replicas (and their CPUs) are released before other packages' tests run.
@pytest.fixture(scope="package")
def served(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedApp]:
    """Deploy configs/serve.yaml's builder (as `solanalm up` does) with test overrides."""
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    settings = settings_for(
        app,
        {
            "model": {
                "served": MODELS,
                "cache_dir": str(model_cache_dir),
                "catalogue": str(repo_root / "configs" / "models.yaml"),
            },
            # The default transport (direct links); test_transports.py runs the others.
            "pipeline": {"num_stages": STAGES, "max_num_seqs": 16, "max_queue": 64},
            "http": {"port": _free_port()},
            "payments": {"state_dir": str(tmp_path_factory.mktemp("payments")), "actor_name": "solanalm-payments-test"},
        },
    )
    deploy(app, settings)
    yield ServedApp(f"http://127.0.0.1:{settings.http.port}/v1", settings)
    serve.shutdown()
