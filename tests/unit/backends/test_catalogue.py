"""The catalogue's backend field: defaults, per-backend options and clear validation errors."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.models import ModelSpec, load_catalogue

GGUF = {"kind": "gguf", "path": "/models/m.gguf"}
PROXY = {"base_url": "http://127.0.0.1:9/v1", "upstream_model": "up"}


def test_repo_catalogue_lists_every_backend(repo_root: Path) -> None:
    catalogue = load_catalogue(repo_root / "configs" / "models.yaml")
    backends = {spec.backend for spec in catalogue.models.values()}
    assert backends == {"transformers", "llamacpp", "vllm", "proxy"}
    assert catalogue.get("tiny-llama").backend == "transformers"
    gguf = catalogue.get("smollm2-135m-instruct-gguf")
    assert gguf.backend == "llamacpp" and gguf.source.gguf_file().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    proxy = catalogue.get("gpt-4o-mini").proxy_options()
    assert (proxy.api, proxy.api_key_env, proxy.cache) == ("openai", "OPENAI_API_KEY", True)
    assert catalogue.get("claude-3-5-haiku").proxy_options().api == "anthropic"
    assert catalogue.get("qwen2.5-7b-instruct").vllm_options().world_size == 2


def test_defaults_and_options() -> None:
    spec = ModelSpec(name="m", source=GGUF)
    assert spec.backend == "transformers" and spec.llamacpp is None and spec.price is None
    proxy = ModelSpec(name="p", backend="proxy", proxy={**PROXY, "base_url": "https://api.x.com/v1/"}, price={})
    assert proxy.source.kind == "remote" and proxy.proxy_options().base_url == "https://api.x.com/v1"
    assert proxy.price is not None and proxy.price.completion_per_1k == 2000
    assert ModelSpec(name="l", backend="llamacpp", source=GGUF).llamacpp_options().max_queue == 16


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"backend": "proxy"}, "backend 'proxy' needs `proxy:"),
        ({"backend": "proxy", "proxy": PROXY, "source": GGUF}, "cannot serve source kind 'gguf'"),
        ({"backend": "llamacpp", "source": {"kind": "tiny"}}, "cannot serve source kind 'tiny'"),
        ({"backend": "transformers", "source": GGUF, "vllm": {}}, "`vllm` options given but backend is"),
        ({"backend": "transformers"}, "cannot serve source kind 'remote'"),
        ({"backend": "tensorrt", "source": GGUF}, "backend"),
        ({"backend": "vllm", "source": GGUF, "vllm": {"tensor_parallel_size": 0}}, "tensor_parallel_size"),
        ({"backend": "proxy", "proxy": {**PROXY, "base_url": "ftp://x"}}, "http\\(s\\) URL"),
        ({"backend": "proxy", "proxy": {**PROXY, "api": "cohere"}}, "api"),
        ({"backend": "proxy", "proxy": {**PROXY, "api_key_env": "MY KEY"}}, "environment variable name"),
        ({"backend": "proxy", "proxy": {**PROXY, "commission_bps": 9000}}, "commission_bps"),
        ({"backend": "proxy", "proxy": {**PROXY, "timeout": 3}}, "timeout"),
    ],
)
def test_invalid_entries_name_the_problem(entry: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec(name="m", **entry)


def test_non_mapping_entry_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("default: a\nmodels:\n  a: proxy\n")
    with pytest.raises(ValueError, match="model 'a' must be a mapping"):
        load_catalogue(path)
