"""Settings sections for the Ray cluster, the model catalogue and the sharded serving pipeline."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from cluster.config.base import Section
from cluster.config.rate_limits import RateLimitsSection

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
DType = Literal["float32", "bfloat16"]
WeightQuant = Literal["none", "int8", "int4"]
INT4_GROUP = 32  # inputs per int4 scale/zero pair: the block of GGUF Q4_1 (serve_apps.engine.quant)
Transport = Literal["direct", "auto", "compiled_graph", "actor_calls"]
StageDevicePreference = Literal["auto", "cpu", "cuda"]
RayAuthMode = Literal["token", "disabled"]


class RaySection(Section):
    """How SolanaLM finds (or starts) its Ray cluster."""

    address: str | None = Field(
        default=None, description="Ray address to join ('auto', 'ray://h:10001', 'h:6379'); None starts a local head."
    )
    namespace: str = Field(default="solanalm", description="Ray namespace of every named actor.")
    num_cpus: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Logical CPUs a local head advertises (None: enough for the configured pipelines).",
    )
    dashboard_host: str = Field(default="127.0.0.1", description="Ray dashboard bind host (local head).")
    dashboard_port: int = Field(default=8265, ge=1, le=65535, description="Ray dashboard port (local head).")
    head_port: int = Field(default=6379, ge=1, le=65535, description="GCS port of a local head.")
    client_server_port: int = Field(
        default=10001, ge=1024, le=65535, description="Ray Client server port of a local head (ray://h:port)."
    )
    auth: RayAuthMode = Field(
        default="token",
        description=(
            "token: a local head starts with Ray's token auth (RAY_AUTH_MODE=token) and drivers present the "
            "token; disabled: SolanaLM sets no RAY_AUTH_* variable (only where something else guards Ray's ports)."
        ),
    )
    auth_token_path: Path | None = Field(
        default=None,
        description="Ray auth token file (created 0600 if missing); None: <state dir>/ray-auth-token.",
    )
    tls: bool = Field(
        default=False,
        description="Mutual TLS between Ray processes (RAY_USE_TLS) with the certificates of `solanalm tls init`.",
    )
    tls_dir: Path | None = Field(
        default=None, description="Directory of ca.crt, node.crt and node.key; None: <state dir>/tls."
    )


class HttpSection(Section):
    """The OpenAI-compatible HTTP endpoint (Ray Serve proxy)."""

    host: str = Field(default="127.0.0.1", description="Serve HTTP proxy bind host.")
    port: int = Field(default=8000, ge=1, le=65535, description="Serve HTTP proxy port.")
    app_name: str = Field(default="solanalm", description="Ray Serve application name.")
    route_prefix: str = Field(default="/", description="Route prefix of the application.")
    gateway_replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Replicas of the OpenAI ingress (the gateway), spread by Serve's proxy; they share the payments"
        " workers and ledger. Rate limits and the response cache are kept per replica.",
    )
    startup_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=7_200,
        description="Longest wait for Serve's HTTP proxies and the application to become ready at deploy"
        " (a slow or loaded machine needs minutes); past it, `up` stops what it started and says what it waited for.",
    )
    rate_limits: RateLimitsSection = Field(
        default_factory=RateLimitsSection, description="Request limits per client address, per wallet, per route."
    )
    max_body_bytes: int = Field(
        default=1_000_000, ge=1024, le=100_000_000, description="Largest request body accepted."
    )
    ssl_certfile: Path | None = Field(
        default=None, description="PEM certificate (chain) of the Serve proxy: HTTPS when set with ssl_keyfile."
    )
    ssl_keyfile: Path | None = Field(default=None, description="PEM private key of the Serve proxy's certificate.")
    operator_token: SecretStr | None = Field(
        default=None,
        description=(
            "Bearer token of the operator's views (/healthz?detail=1, /v1/network/nodes?detail=1: pids, node "
            "ids, endpoints, errors); None: <state dir>/operator-token, created 0600 when the app is built "
            "(`solanalm operator-token` prints it)."
        ),
    )

    @model_validator(mode="after")
    def _both_tls_files(self) -> "HttpSection":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("set http.ssl_certfile and http.ssl_keyfile together (HTTPS needs both)")
        return self

    @property
    def scheme(self) -> str:
        """https when the proxy has a certificate, else http."""
        return "https" if self.ssl_certfile is not None else "http"


class ModelSection(Section):
    """Which models are served and where their weights are cached."""

    catalogue: Path = Field(default=Path("configs/models.yaml"), description="Model catalogue YAML.")
    served: list[str] = Field(
        default_factory=lambda: ["smollm2-135m-instruct"],
        min_length=1,
        description="Catalogue names served by this application (one pipeline deployment each).",
    )
    cache_dir: Path = Field(
        default=Path("~/.cache/solanalm"),
        validate_default=True,
        description="Converted-weights cache (safetensors per model and dtype) and local state.",
    )
    dtype: DType | None = Field(default=None, description="Override every model's catalogue dtype.")
    weight_quant: WeightQuant | None = Field(
        default=None, description="Override every model's catalogue weight_quant (none, int8, int4)."
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class StagePlacement(Section):
    """One model's planned pipeline: layers per stage and (optionally) the Ray node each stage is pinned to."""

    stage_layers: list[int] = Field(
        min_length=1, max_length=64, description="Decoder layers of each stage, in order; must sum to the model's."
    )
    node_ids: list[str] | None = Field(
        default=None, description="Ray node id of each stage (its bundle gets a node label selector); None: anywhere."
    )

    @field_validator("stage_layers")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(count < 1 for count in value):
            raise ValueError("every stage needs at least one layer")
        return value

    @model_validator(mode="after")
    def _one_node_per_stage(self) -> "StagePlacement":
        if self.node_ids is not None and len(self.node_ids) != len(self.stage_layers):
            raise ValueError("node_ids needs one node id per stage")
        return self


class PipelineSection(Section):
    """Shape and limits of one sharded pipeline (one per Serve replica)."""

    num_stages: int = Field(default=2, ge=1, le=64, description="Contiguous layer ranges, one stage actor each.")
    num_replicas: int = Field(default=1, ge=1, le=1024, description="Independent pipelines per model.")
    stage_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Placement-group bundle per stage, e.g. {'CPU': 1} or {'GPU': 1, 'CPU': 2}.",
    )
    placement_strategy: PlacementStrategy = Field(
        default="PACK", description="PACK on one machine; SPREAD or STRICT_SPREAD across provider nodes."
    )
    max_batch_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Sequences decoded together in one step (on CPU a 32-row step costs far less than two of 16).",
    )
    max_num_seqs: int = Field(default=32, ge=1, le=4096, description="KV-cache slots: sequences resident at once.")
    max_queue: int = Field(default=256, ge=0, le=100_000, description="Requests waiting for a slot before 503.")
    max_model_len: int | None = Field(
        default=None, ge=16, le=1_000_000, description="Context limit (prompt + completion); None: the model's."
    )
    max_inflight_steps: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "Steps in flight at once (pipelining: decodes split into this many micro-batches); None: as many as "
            "stages can compute at once (the stage count, fewer where a node's cores cannot run all its stages)."
        ),
    )
    transport: Transport = Field(
        default="direct",
        description=(
            "Stage-to-stage transport: direct (each stage streams its output to the next over its own TCP "
            "connection, the last one back to the replica), actor_calls (plain actor calls, each hop through the "
            "replica), compiled_graph (Ray compiled graph, shared-memory channels that poll), or auto: a compiled "
            "graph while every stage is on one node and nothing failed, then actor calls for good."
        ),
    )
    kv_cache_bytes: int | None = Field(
        default=None,
        ge=2**20,
        description="KV-cache memory per stage in bytes; None: kv_memory_fraction of the node's free memory.",
    )
    kv_memory_fraction: float = Field(
        default=0.3, gt=0, le=0.95, description="Share of free memory the stages' KV caches may plan to use."
    )
    low_bit_max_tokens: int = Field(
        default=12,
        ge=0,
        le=4096,
        description="Steps of at most this many tokens use a model's int4/int8 weights (weight_quant), larger ones "
        "the dense weights: low-bit kernels win while reading weights dominates (docs/benchmarks.md).",
    )
    prefill_chunk: int = Field(default=512, ge=16, le=65_536, description="Most prompt tokens of one prefill step.")
    device: StageDevicePreference = Field(
        default="auto",
        description=(
            "Where stages compute: auto (a stage whose bundle reserves a GPU runs on it when torch has CUDA, "
            "else CPU), cpu (always, even in a GPU bundle), cuda (refused at load where there is none)."
        ),
    )
    cuda_graphs: bool = Field(
        default=True,
        description="On CUDA, replay decode-only steps from CUDA graphs captured per padded batch size (never on CPU).",
    )
    gpu_memory_fraction: float = Field(
        default=0.9,
        gt=0,
        le=0.98,
        description="Share of a GPU's free memory (before its weights load) a stage plans weights, activations and KV "
        "slots in.",
    )
    recovery_timeout_s: float = Field(
        default=300.0, gt=0, le=86_400, description="How long a replica keeps recreating dead stages before giving up."
    )
    stage_call_timeout_s: float = Field(default=120.0, gt=0, le=3600, description="Timeout of one stage call.")
    request_timeout_s: float = Field(default=600.0, gt=0, le=86_400, description="Whole-request timeout.")
    placements: dict[str, StagePlacement] = Field(
        default_factory=dict,
        description="Per served model: planned stage layer counts and nodes (overrides num_stages' equal split).",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30.0, ge=0, le=3600, description="How long a replica being replaced may finish its requests."
    )

    @field_validator("stage_resources")
    @classmethod
    def _bundle_has_compute(cls, value: dict[str, float]) -> dict[str, float]:
        if not any(value.get(key, 0) > 0 for key in ("CPU", "GPU")):
            raise ValueError("stage_resources needs CPU or GPU > 0")
        if any(amount < 0 for amount in value.values()):
            raise ValueError("stage_resources amounts must be >= 0")
        return value
