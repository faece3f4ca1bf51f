"""vLLM on a GPU node: the tiny Llama (an HF directory) served by a vLLM replica through the gateway.

Marked `gpu`; skipped where vLLM or a CUDA GPU is missing (CI, CPU nodes). It deploys its own Serve
application (name `vllm-test`) with tensor_parallel_size 1: /v1/models shows the backend, a greedy
completion has the asked length, and its stream carries the same text.
"""

import importlib.util
from pathlib import Path

import pytest
import yaml
from ray import serve

from cluster.deploy import deploy, read_serve_config, settings_for
from cluster.models import load_catalogue, materialize
from tests.integration.backends.conftest import Deployed, free_port


def _cuda() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs vLLM (extra `gpu`) and a CUDA GPU")]


def test_vllm_replica_serves_through_the_gateway(
    ray_cluster: None, repo_root: Path, model_cache_dir: Path, tmp_path: Path
) -> None:
    catalogue_path = repo_root / "configs/models.yaml"
    tiny_dir = materialize(load_catalogue(catalogue_path).get("tiny-llama"), model_cache_dir)
    raw = yaml.safe_load(catalogue_path.read_text())
    raw["models"]["tiny-vllm"] = {
        "backend": "vllm",
        "source": {"kind": "hf_dir", "path": str(tiny_dir)},
        "max_model_len": 512,
        "vllm": {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.3, "enforce_eager": True},
    }
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text(yaml.safe_dump(raw))
    app = read_serve_config(repo_root / "configs/serve.yaml")
    settings = settings_for(
        app,
        {
            "model": {"served": ["tiny-vllm"], "catalogue": str(catalogue), "cache_dir": str(model_cache_dir)},
            "http": {"port": free_port(), "app_name": "vllm-test"},
            "payments": {"enabled": False},
        },
    )
    deploy(app, settings)
    try:
        api = Deployed(f"http://127.0.0.1:{settings.http.port}/v1", settings).client()
        assert {m.id: m.backend for m in api.models.list().data} == {"tiny-vllm": "vllm"}  # type: ignore[attr-defined]
        reply = api.completions.create(model="tiny-vllm", prompt="Once upon a time", max_tokens=8, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens == 8 and reply.choices[0].text
        chunks = list(
            api.completions.create(
                model="tiny-vllm", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    finally:
        serve.delete("vllm-test")
