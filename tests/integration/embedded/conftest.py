"""One `solanalm up`-style deployment (cluster.cli.start_serving, the embedded default's start-up) for the
embedded-network and TUI tests: tiny-llama in one stage, JSON logs, payments off, its own registry name."""

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from cluster.cli import Serving, start_serving, stop_serving
from cluster.config import Settings
from cluster.deploy import read_serve_config, settings_for

MODEL = "tiny-llama"
# The registry's namespace: settings.ray.namespace, which the builder's replicas read from their own settings
# (the application's args carry no `ray` section), so the default, not the test driver's namespace.
NAMESPACE = Settings().ray.namespace


@dataclass(frozen=True)
class Embedded:
    serving: Serving
    address: str  # the Ray cluster's GCS address, for CLI processes

    @property
    def settings(self) -> Settings:
        return self.serving.settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http.port}/v1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="package")
def embedded(ray_cluster: None, repo_root: Path, model_cache_dir: Path) -> Iterator[Embedded]:
    address = ray.get_runtime_context().gcs_address
    app = read_serve_config(repo_root / "configs" / "serve.yaml")
    settings = settings_for(
        app,
        {
            "ray": {"address": address},
            "model": {
                "served": [MODEL],
                "cache_dir": str(model_cache_dir),
                "catalogue": str(repo_root / "configs" / "models.yaml"),
            },
            "pipeline": {"num_stages": 1, "max_num_seqs": 4, "max_queue": 8},
            "http": {"port": _free_port(), "app_name": f"embedded-{uuid.uuid4().hex[:6]}"},
            "payments": {"enabled": False},
            "logging": {"format": "json", "level": "INFO"},
            "network": {"registry_name": f"solanalm-registry-{uuid.uuid4().hex[:8]}", "persist_interval_s": 0},
        },
    )
    serving = start_serving(app, settings)
    try:
        yield Embedded(serving, address)
    finally:
        stop_serving(serving)
        from ray.experimental import internal_kv as kv

        network = settings.network
        ray.kill(ray.get_actor(network.registry_name, namespace=NAMESPACE))
        kv._internal_kv_del(f"{network.registry_name}/", del_by_prefix=True, namespace=network.kv_namespace)
