"""build_app picks each model's deployment by backend and carries catalogue prices (nothing deployed)."""

from pathlib import Path

import yaml

from serve_apps.builder import build_app


def test_each_backend_gets_its_deployment_and_card(repo_root: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((repo_root / "configs/models.yaml").read_text())
    raw["models"]["gpt-4o-mini"]["price"] = {"prompt_per_1k": 7, "completion_per_1k": 9}
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text(yaml.safe_dump(raw))
    served = ["tiny-llama", "gpt-4o-mini", "smollm2-135m-instruct-gguf", "qwen2.5-7b-instruct"]
    ingress = build_app({"model": {"served": served, "catalogue": str(catalogue)}})._bound_deployment
    pipelines, cards = ingress.init_args[0], ingress.init_args[1]
    assert {name: bound._bound_deployment.name for name, bound in pipelines.items()} == {
        "tiny-llama": "pipeline-tiny-llama",
        "gpt-4o-mini": "proxy-gpt-4o-mini",
        "smollm2-135m-instruct-gguf": "llamacpp-smollm2-135m-instruct-gguf",
        "qwen2.5-7b-instruct": "vllm-qwen2.5-7b-instruct",
    }
    assert {card.id: card.backend for card in cards} == {
        "tiny-llama": "transformers",
        "gpt-4o-mini": "proxy",
        "smollm2-135m-instruct-gguf": "llamacpp",
        "qwen2.5-7b-instruct": "vllm",
    }
    prices = ingress.init_args[5].prices
    assert list(prices) == ["gpt-4o-mini"] and (
        prices["gpt-4o-mini"].prompt_per_1k,
        prices["gpt-4o-mini"].completion_per_1k,
    ) == (7, 9)
