"""The Serve deployment of a catalogue entry whose backend is not the sharded engine.

`serve_apps.builder.build_app` keeps building PipelineServer deployments for `transformers` models and
asks `backend_deployment` for the others; every one is bound to the same ingress, which routes by model
name and never learns which backend answers.
"""

from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve.deployment import Application

from cluster.config import Settings
from cluster.models import ModelSpec
from serve_apps.backends.vllm_config import vllm_actor_options

HEALTH = {"health_check_period_s": 10, "health_check_timeout_s": 60, "graceful_shutdown_timeout_s": 30}


def backend_deployment(spec: ModelSpec, settings: Settings) -> Application:
    """The bound deployment serving `spec` (llamacpp, vllm or proxy)."""
    if spec.backend == "llamacpp":
        return llamacpp_deployment(spec).bind(spec.name, settings)
    if spec.backend == "vllm":
        return vllm_deployment(spec).bind(spec.name, settings)
    if spec.backend == "proxy":
        return proxy_deployment(spec).bind(spec.name, settings, proxy_key(spec))
    raise ValueError(f"model {spec.name!r}: backend {spec.backend!r} is built by the sharded-engine builder")


def llamacpp_deployment(spec: ModelSpec) -> Any:
    from serve_apps.backends.llamacpp import LlamaCppServer

    options = spec.llamacpp_options()
    return serve.deployment(LlamaCppServer).options(  # type: ignore[attr-defined]
        name=f"llamacpp-{spec.name}",
        num_replicas=options.num_replicas,
        ray_actor_options={"num_cpus": options.num_cpus},
        max_ongoing_requests=options.max_queue + 1 + 8,  # above the gate: its 503s come from the replica
        **HEALTH,
    )


def vllm_deployment(spec: ModelSpec) -> Any:
    from serve_apps.backends.vllm_server import VllmServer

    options = spec.vllm_options()
    return serve.deployment(VllmServer).options(  # type: ignore[attr-defined]
        name=f"vllm-{spec.name}",
        num_replicas=options.num_replicas,
        # The replica holds what its `vllm serve` child uses (one node): Ray sets its CUDA_VISIBLE_DEVICES.
        ray_actor_options=vllm_actor_options(options),
        max_ongoing_requests=options.max_num_seqs * 2,
        **{**HEALTH, "health_check_timeout_s": 120},
    )


def proxy_deployment(spec: ModelSpec) -> Any:
    from serve_apps.backends.proxy.server import ProxyServer

    options = spec.proxy_options()
    return serve.deployment(ProxyServer).options(  # type: ignore[attr-defined]
        name=f"proxy-{spec.name}",
        num_replicas=1,  # the rate limit and cache are per replica: one replica keeps them exact
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=options.max_concurrency + 8,
        **HEALTH,
    )


def proxy_key(spec: ModelSpec) -> SecretStr | None:
    """The upstream key as the builder sees it (the replica prefers its own environment's)."""
    from serve_apps.backends.proxy.server import upstream_key

    return upstream_key(spec.proxy_options().api_key_env)
