"""Which Serve deployment each backend gets (options only; nothing is deployed)."""

import pytest
from pydantic import SecretStr

from cluster.models import ModelSpec
from serve_apps.backends.deployments import llamacpp_deployment, proxy_deployment, proxy_key, vllm_deployment

GGUF = {"kind": "gguf", "path": "/m.gguf"}


def test_vllm_replica_holds_its_process_resources() -> None:
    spec = ModelSpec(
        name="q",
        backend="vllm",
        source={"kind": "hf_dir", "path": "/q"},
        vllm={"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "gpus_per_worker": 0.5},
    )
    deployment = vllm_deployment(spec)
    # One node: the replica takes the GPUs its `vllm serve` child uses, so Ray sets CUDA_VISIBLE_DEVICES.
    assert deployment.name == "vllm-q" and deployment.ray_actor_options == {"num_cpus": 4.0, "num_gpus": 2.0}
    assert deployment._replica_config.placement_group_bundles is None
    cpu = vllm_deployment(
        ModelSpec(name="c", backend="vllm", source={"kind": "tiny"}, vllm={"device": "cpu", "cpus_per_worker": 2})
    )
    assert cpu.ray_actor_options == {"num_cpus": 2.0}


def test_llamacpp_and_proxy_replicas() -> None:
    llama = llamacpp_deployment(
        ModelSpec(name="g", backend="llamacpp", source=GGUF, llamacpp={"num_cpus": 2, "num_replicas": 3})
    )
    assert (llama.name, llama.num_replicas, llama.ray_actor_options["num_cpus"]) == ("llamacpp-g", 3, 2)
    assert llama._replica_config.placement_group_bundles is None
    proxy = proxy_deployment(
        ModelSpec(name="p", backend="proxy", proxy={"base_url": "http://u", "upstream_model": "m"})
    )
    assert (proxy.name, proxy.num_replicas, proxy.ray_actor_options["num_cpus"]) == ("proxy-p", 1, 0)


def test_proxy_key_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(
        name="p", backend="proxy", proxy={"base_url": "http://u", "upstream_model": "m", "api_key_env": "K1"}
    )
    monkeypatch.delenv("K1", raising=False)
    assert proxy_key(spec) is None
    monkeypatch.setenv("K1", "sk-secret")
    key = proxy_key(spec)
    assert isinstance(key, SecretStr) and key.get_secret_value() == "sk-secret" and "sk-secret" not in repr(key)
