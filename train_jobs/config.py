"""Typed training job configs, parsed from `configs/train/*.yaml` (strict: unknown keys are errors).

Two job kinds share the model, data, optimiser and LoRA blocks:
`DataParallelJob` (Ray Train TorchTrainer, DDP) and `FederatedJob` (Flower simulation with DP-SGD).
"""

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ShardingStrategy = Literal["round_robin", "hash", "random"]
PromptFormat = Literal["chat", "plain"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """A catalogue entry to fine-tune; weights come from `cluster.models.materialize`."""

    name: str = Field(default="tiny-llama", description="Catalogue model name.")
    catalogue: Path = Field(default=Path("configs/models.yaml"), description="Model catalogue YAML.")
    cache_dir: Path = Field(default=Path("~/.cache/solanalm"), description="Materialised-weights cache.")

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class DataSpec(_Strict):
    """Which examples, how they are tokenised and how the held-out split is drawn."""

    path: Path | None = Field(
        default=None,
        description="Local JSONL ({instruction, response} or {text}) or .txt; None: bundled set.",
    )
    prompt_format: PromptFormat = Field(
        default="plain",
        description="plain: '### Instruction/### Response' text; chat: the tokenizer's template.",
    )
    max_length: int = Field(default=64, ge=8, le=8192, description="Tokens per example (padded/truncated).")
    eval_fraction: float = Field(default=0.1, gt=0, lt=1, description="Held-out share of the examples.")
    max_examples: int | None = Field(default=None, ge=2, description="Use at most this many examples (None: all).")
    seed: int = Field(default=0, description="Seed of the held-out split and the random sharding strategy.")


class OptimSpec(_Strict):
    """Optimiser and step budget."""

    learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, le=1.0, description="AdamW weight decay.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Examples per step per worker/client.")
    max_steps: int = Field(default=20, ge=1, le=10**7, description="Optimizer steps (per worker / per client round).")
    seed: int = Field(default=0, description="Torch seed of LoRA init and dropout.")


class LoraSpec(_Strict):
    """LoRA adapters (peft): only these are trained and, in federated runs, exchanged."""

    r: int = Field(default=8, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=16, ge=1, le=4096, description="Adapter scaling numerator.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Adapter dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Module names that get adapters.",
    )


class PrivacySpec(_Strict):
    """Opacus DP-SGD in each client (per-example clipping, Gaussian noise, RDP accounting)."""

    enabled: bool = Field(default=False, description="Train with DP-SGD.")
    noise_multiplier: float = Field(default=1.0, ge=0, le=100, description="Noise std / clipping norm.")
    max_grad_norm: float = Field(default=1.0, gt=0, le=1e6, description="Per-example gradient clipping norm.")
    delta: float = Field(default=1e-5, gt=0, lt=1, description="Target delta of the reported (epsilon, delta).")
    max_epsilon: float | None = Field(
        default=None,
        gt=0,
        le=1e6,
        description="Each client's epsilon budget over the job (at delta); None: unlimited. A client whose "
        "spend plus one more round would exceed it is not selected, and its own node refuses to train past it.",
    )


class ServerDPSpec(_Strict):
    """Flower's server-side fixed-clipping DP wrapper around FedAvg (central DP on updates)."""

    enabled: bool = Field(default=False, description="Wrap the strategy with server-side DP.")
    noise_multiplier: float = Field(default=0.1, ge=0, le=100, description="Noise std / clipping norm.")
    clipping_norm: float = Field(default=10.0, gt=0, le=1e6, description="Clipping norm of each client update.")


class SecureAggregationSpec(_Strict):
    """Flower's SecAgg+ (`SecAggPlusWorkflow` + `secaggplus_mod`): the server only ever sees the sum of
    the selected clients' masked, quantized updates, never one in the clear."""

    enabled: bool = Field(default=False, description="Aggregate with SecAgg+ instead of plain FedAvg.")
    num_shares: int = Field(
        default=3,
        ge=3,
        le=10_000,
        description="Shares each client's mask secrets are split into (its neighbours, itself included); "
        "capped by the clients selected in a round.",
    )
    reconstruction_threshold: int = Field(
        default=2,
        ge=2,
        le=10_000,
        description="Shares needed to rebuild a secret: a round survives while every selected client keeps "
        "at least this many live neighbours (so num_shares - reconstruction_threshold dropouts per "
        "neighbourhood); higher is more private, less tolerant.",
    )
    clipping_range: float = Field(
        default=8.0,
        gt=0,
        le=1e6,
        description="Each adapter weight is clipped to [-clipping_range, clipping_range] before quantization.",
    )
    quantization_range: int = Field(
        default=2**22,
        ge=2**8,
        le=2**24,
        description="Integer levels a clipped weight is quantized into; the mean's error per weight is "
        "about clients * 2 * clipping_range / quantization_range * max_weight / (the round's examples). "
        "The mask modulus is 2**32.",
    )
    max_weight: float = Field(
        default=1000.0,
        gt=0,
        le=1e9,
        description="Largest aggregation weight (examples) one client can carry; at least "
        "optim.max_steps * optim.batch_size, the most a round credits.",
    )


class ClientResources(_Strict):
    """Ray resources of one Flower ClientApp actor (the simulation builds its pool from these)."""

    num_cpus: float = Field(default=1.0, gt=0, le=1024, description="Logical CPUs per client actor.")
    num_gpus: float = Field(default=0.0, ge=0, le=64, description="GPUs per client actor (fractions share one).")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="torch intra-op threads per client (None: torch's default).",
    )


class FaultInjection(_Strict):
    """Testing aid: a worker SIGKILLs itself once, to exercise FailureConfig resume."""

    rank: int = Field(default=1, ge=0, description="World rank of the worker that dies.")
    at_step: int = Field(ge=1, description="It dies right after finishing this step (once per run).")


class _JobBase(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Run name (directory name).")
    model: ModelRef = Field(default_factory=ModelRef)
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    sharding: ShardingStrategy = Field(default="round_robin", description="How examples are split among workers.")
    storage_path: Path | None = Field(default=None, description="Run output root; None: training.output_dir.")

    @field_validator("storage_path")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None


class DataParallelJob(_JobBase):
    """A Ray Train TorchTrainer DDP fine-tune."""

    kind: Literal["data_parallel"] = "data_parallel"
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters only; None: full fine-tune.")
    num_workers: int = Field(default=2, ge=1, le=4096, description="DDP workers (one process each).")
    use_gpu: bool = Field(default=False, description="NCCL on GPUs; False: gloo on CPU.")
    cpus_per_worker: float = Field(default=1.0, gt=0, le=1024, description="Logical CPUs per worker.")
    checkpoint_every_steps: int = Field(default=5, ge=1, description="Report a checkpoint every N steps.")
    num_to_keep: int = Field(default=2, ge=1, le=1000, description="Checkpoints kept (CheckpointConfig).")
    max_failures: int = Field(default=1, ge=-1, le=1000, description="Worker-group restarts (FailureConfig).")
    fault_injection: FaultInjection | None = Field(default=None, description="Testing only: kill a worker once.")

    @model_validator(mode="after")
    def _fault_rank_exists(self) -> "DataParallelJob":
        if self.fault_injection is not None and self.fault_injection.rank >= self.num_workers:
            raise ValueError("fault_injection.rank must be < num_workers")
        return self


class FederatedJob(_JobBase):
    """Flower FedAvg rounds over K simulated clients, LoRA adapters exchanged, optional DP-SGD."""

    kind: Literal["federated"] = "federated"
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapters trained and exchanged.")
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    server_dp: ServerDPSpec = Field(default_factory=ServerDPSpec)
    secure_aggregation: SecureAggregationSpec = Field(default_factory=SecureAggregationSpec)
    num_clients: int = Field(default=3, ge=1, le=10_000, description="Simulated clients (private partitions).")
    num_rounds: int = Field(default=2, ge=1, le=10_000, description="FedAvg rounds.")
    fraction_train: float = Field(default=1.0, gt=0, le=1, description="Share of clients selected per round.")
    min_train_clients: int = Field(default=2, ge=1, description="Selected clients per round, at least.")
    min_available_clients: int = Field(default=2, ge=1, description="Clients that must be connected to start.")
    client_resources: ClientResources = Field(default_factory=ClientResources)
    client_keypairs: list[Path] = Field(
        default_factory=list,
        description="Solana CLI keypair file of each client's reward wallet, by client; empty: each client "
        "generates one in its state dir (client_state_dir/client-N/, mode 0600) on first use.",
    )
    client_state_dir: Path | None = Field(
        default=None,
        description="Where simulated clients keep their state (generated keypairs); None: <run dir>/clients.",
    )
    reward_budget_per_round_lamports: int = Field(
        default=1_000_000,
        ge=0,
        le=10**15,
        description="Most a round pays in rewards, in lamports; a round that earns more is scaled down "
        "pro rata (rounded down), so it never pays more than this.",
    )
    registration_ttl_s: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="How long a client's registration nonce is good for, in seconds.",
    )
    round_timeout_s: float = Field(default=600.0, gt=0, le=86_400, description="Wait for replies, per round.")
    simulate_drops: dict[int, list[int]] = Field(
        default_factory=dict,
        description="Testing/bench: {round: [partition ids]} that crash mid-round.",
    )

    @field_validator("client_keypairs")
    @classmethod
    def _expand_keypairs(cls, value: list[Path]) -> list[Path]:
        return [path.expanduser() for path in value]

    @field_validator("client_state_dir")
    @classmethod
    def _expand_state_dir(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> "FederatedJob":
        if self.client_keypairs and len(self.client_keypairs) != self.num_clients:
            raise ValueError(f"client_keypairs has {len(self.client_keypairs)} entries for {self.num_clients} clients")
        if self.min_train_clients > self.num_clients or self.min_available_clients > self.num_clients:
            raise ValueError("min_train_clients and min_available_clients must be <= num_clients")
        bad = [p for ids in self.simulate_drops.values() for p in ids if not 0 <= p < self.num_clients]
        if bad:
            raise ValueError(f"simulate_drops names unknown partitions {bad}")
        if self.secure_aggregation.enabled:
            self._check_secure_aggregation()
        return self

    def _check_secure_aggregation(self) -> None:
        secagg = self.secure_aggregation
        if self.server_dp.enabled:
            raise ValueError(
                "secure_aggregation and server_dp cannot be combined: server-side DP clips each client's "
                "update, which SecAgg+ hides from the server; use local DP-SGD (privacy.enabled) instead"
            )
        if secagg.reconstruction_threshold >= secagg.num_shares:
            raise ValueError("secure_aggregation.reconstruction_threshold must be < num_shares")
        if self.min_train_clients < secagg.reconstruction_threshold:
            raise ValueError(
                f"secure_aggregation needs min_train_clients >= reconstruction_threshold "
                f"({secagg.reconstruction_threshold}): fewer clients cannot rebuild each other's masks"
            )
        if secagg.max_weight < self.optim.max_steps * self.optim.batch_size:
            raise ValueError(
                f"secure_aggregation.max_weight ({secagg.max_weight:g}) must be >= optim.max_steps * "
                f"optim.batch_size ({self.optim.max_steps * self.optim.batch_size}): a larger weight overflows"
            )


def with_secure_aggregation(job: FederatedJob, enabled: bool | None) -> FederatedJob:
    """`job` with `secure_aggregation.enabled` set (None: as configured), validated again (a CLI flag
    that turns it on for a job with server_dp is refused like the YAML would be)."""
    if enabled is None:
        return job
    raw = job.model_dump(mode="json")
    raw["secure_aggregation"]["enabled"] = enabled
    return FederatedJob.model_validate(raw)


Job = TypeVar("Job", DataParallelJob, FederatedJob)


def load_job(path: Path | str, job_type: type[Job], **overrides: Any) -> Job:
    """Parse a job YAML into `job_type`; keyword overrides replace top-level keys."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping")
    raw.update({key: value for key, value in overrides.items() if value is not None})
    return job_type.model_validate(raw)
