"""Catalogue entry -> vLLM engine arguments and the replica's placement-group bundles (pure; no vllm import).

As in Ray Serve LLM (`ray.llm._internal.serve.engines.vllm.vllm_models`): the replica reserves one
bundle per vLLM worker (tensor_parallel_size x pipeline_parallel_size), and vLLM's Ray executor
(`distributed_executor_backend="ray"`) starts its workers inside the replica's placement group, so
Serve's scheduling of the replica *is* the GPU placement of the model. The replica itself reserves no
CPU (like PipelineServer) so every bundle stays exactly one worker's.
"""

from dataclasses import dataclass
from typing import Any

from cluster.models import ModelSpec
from cluster.models.catalogue import VllmOptions
from serve_apps.protocol import ProviderWork

ENGINE_SEED = 0


@dataclass(frozen=True, slots=True)
class VllmPlacement:
    """What the Serve deployment reserves per replica."""

    bundles: list[dict[str, float]]
    strategy: str
    env_vars: dict[str, str]


def vllm_placement(options: VllmOptions) -> VllmPlacement:
    """One bundle per worker; fractional GPUs per worker are told to vLLM through its env var."""
    bundle: dict[str, float] = {"GPU": options.gpus_per_worker}
    if options.cpus_per_worker > 0:
        bundle["CPU"] = options.cpus_per_worker
    env = {}
    if options.gpus_per_worker < 1:
        env["VLLM_RAY_PER_WORKER_GPUS"] = str(options.gpus_per_worker)
    return VllmPlacement([dict(bundle) for _ in range(options.world_size)], options.placement_strategy, env)


def vllm_engine_kwargs(spec: ModelSpec, model_path: str, tokenizer_path: str | None = None) -> dict[str, Any]:
    """`vllm.AsyncEngineArgs(**kwargs)` of a catalogue entry served from `model_path` (a local HF dir or GGUF)."""
    if spec.backend != "vllm":
        raise ValueError(f"model {spec.name!r} has backend {spec.backend!r}, not 'vllm'")
    options = spec.vllm_options()
    kwargs: dict[str, Any] = {
        "model": model_path,
        "served_model_name": [spec.name],
        "dtype": spec.dtype,
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "distributed_executor_backend": "ray",
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "max_num_seqs": options.max_num_seqs,
        "enforce_eager": options.enforce_eager,
        "enable_prefix_caching": options.enable_prefix_caching,
        "trust_remote_code": False,  # local weights only, never code from a model directory
        "seed": ENGINE_SEED,
    }
    optional = {
        "tokenizer": tokenizer_path,
        "max_model_len": spec.max_model_len,
        "max_num_batched_tokens": options.max_num_batched_tokens,
        "quantization": options.quantization,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    return kwargs


def vllm_provider_work(
    bundle_nodes: list[str], wallets: dict[str, str], num_layers: int, pipeline_parallel_size: int
) -> tuple[ProviderWork, ...]:
    """Who is paid for a vLLM replica: each worker bundle's node wallet, credited its stage's layers.

    A tensor-parallel worker computes a share of every layer of its pipeline stage, so each worker
    counts its stage's layers; workers on one wallet's nodes add up.
    """
    if not bundle_nodes:
        return (ProviderWork(None, num_layers),)
    per_worker = -(-num_layers // pipeline_parallel_size)
    work: dict[str | None, int] = {}
    for node in bundle_nodes:
        wallet = wallets.get(node)
        work[wallet] = work.get(wallet, 0) + per_worker
    return tuple(ProviderWork(wallet, layers) for wallet, layers in work.items())
