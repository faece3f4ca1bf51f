"""Provider-network settings section: registry, wallet proofs, reputation, routing weights, placement.

Reputation is a number in [0, 1]; every step below is a fraction of the distance to the bound it moves
towards (see docs/network.md for the rule). Times are in seconds.
"""

from pydantic import Field, model_validator

from cluster.config.base import Section


class ReputationSection(Section):
    """How request outcomes and audits move a node's reputation (all fractions in [0, 1])."""

    initial: float = Field(default=0.5, ge=0, le=1, description="Reputation of a newly verified node.")
    min_eligible: float = Field(
        default=0.2, ge=0, le=1, description="Nodes below this get no new stages (placement skips them)."
    )
    success_step: float = Field(
        default=0.01, ge=0, le=1, description="A served request moves reputation this fraction towards 1."
    )
    failure_step: float = Field(
        default=0.05, ge=0, le=1, description="A failed request moves reputation this fraction towards 0."
    )
    verification_pass_step: float = Field(
        default=0.05, ge=0, le=1, description="A passed audit moves reputation this fraction towards 1."
    )
    verification_fail_step: float = Field(
        default=0.5, ge=0, le=1, description="A failed audit moves reputation this fraction towards 0."
    )
    latency_ewma_alpha: float = Field(
        default=0.2, gt=0, le=1, description="Weight of the newest sample in the latency EWMA."
    )


class RoutingWeights(Section):
    """Weights of a replica's score in the request router (higher score is preferred)."""

    success: float = Field(default=1.0, ge=0, le=100, description="Weight of the success rate.")
    latency: float = Field(default=1.0, ge=0, le=100, description="Weight of 1 / (1 + latency / reference).")
    load: float = Field(default=1.0, ge=0, le=100, description="Weight of 1 / (1 + queued requests).")
    reputation: float = Field(default=2.0, ge=0, le=100, description="Weight of the reputation.")
    latency_reference_s: float = Field(
        default=1.0, gt=0, le=3600, description="Latency at which the latency term is one half."
    )
    score_tolerance: float = Field(
        default=0.02, ge=0, le=1, description="Replicas whose scores differ by less share a rank (shorter queue wins)."
    )
    stats_period_s: float = Field(
        default=2.0, gt=0, le=3600, description="How often Serve collects each replica's routing stats."
    )


class VerificationSection(Section):
    """Audits of served traffic: what the coordinator keeps of its audited sequences for the auditor."""

    max_tokens: int = Field(
        default=128,
        ge=1,
        le=8192,
        description="Positions kept per audited sequence and provider stage; later positions are not audited.",
    )
    audit_max_sequences: int = Field(
        default=64,
        ge=0,
        le=10_000,
        description="Audited sequences a replica keeps records of at once; a sequence drawn beyond this is"
        " served without an audit (counted).",
    )


class PlacementSection(Section):
    """How stages are planned over provider nodes."""

    max_stages: int = Field(default=8, ge=1, le=64, description="Most stages (nodes) in one pipeline.")
    operator_throughput_gflops: float | None = Field(
        default=None,
        gt=0,
        le=10_000_000,
        description="Dense-matmul GFLOP/s the operator's own nodes are planned with (a benchmarked figure);"
        " None: measured on the driver at planning time (noisy on a busy machine).",
    )
    memory_headroom: float = Field(
        default=0.2, ge=0, lt=1, description="Fraction of a node's memory kept free of weights (KV, activations)."
    )
    min_stage_gain: float = Field(
        default=0.05,
        ge=0,
        le=10,
        description="A further stage must raise pipeline throughput by this fraction (each stage adds a hop).",
    )
    node_label_key: str = Field(
        default="ray.io/node-id", min_length=1, description="Node label that pins a stage bundle to its node."
    )
    watch_interval_s: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        description="How often the placement controller checks the registry for departed (dead/draining) nodes.",
    )
    use_registry: bool = Field(
        default=True,
        description="Plan stages over the registry's eligible provider nodes when one runs (else equal split).",
    )


class ProvidersSection(Section):
    """Providers outside the Ray cluster: wallet-proved registration over the gateway's HTTP API, heartbeats."""

    challenge_ttl_s: float = Field(default=120.0, ge=5, le=3600, description="Lifetime of a registration challenge.")
    max_pending_challenges: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Unanswered challenges kept at once (the challenge route is unauthenticated; beyond this: 429).",
    )
    heartbeat_interval_s: float = Field(
        default=10.0, gt=0, le=600, description="How often a registered provider heartbeats (told at registration)."
    )
    heartbeat_ttl_s: float = Field(
        default=35.0,
        gt=0,
        le=3600,
        description="A provider whose last heartbeat is older than this is dead (must exceed the interval).",
    )
    max_per_wallet: int = Field(
        default=8, ge=1, le=1024, description="Live (not dead) provider registrations one wallet may hold."
    )
    max_models: int = Field(default=16, ge=1, le=256, description="Models one provider may advertise.")
    probe_timeout_s: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="Before registering, the gateway completes a TLS handshake with the endpoint, trusting only"
        " the signed certificate (proves the registrant runs that stage host; no squatting others' addresses);"
        " 0 skips the probe.",
    )
    allow_private_endpoints: bool = Field(
        default=True,
        description="Accept loopback and private-network endpoints (single-machine and LAN networks); set false"
        " where every provider must be reachable on a public address.",
    )

    @model_validator(mode="after")
    def _ttl_exceeds_interval(self) -> "ProvidersSection":
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"providers.heartbeat_ttl_s ({self.heartbeat_ttl_s}) must exceed heartbeat_interval_s"
                f" ({self.heartbeat_interval_s}): one late heartbeat must not kill a provider"
            )
        return self


class NetworkSection(Section):
    """The provider network: wallet-proved joining, the node registry, reputation, routing, audits."""

    registry_name: str = Field(
        default="solanalm-registry", min_length=1, description="Named detached Ray actor of the registry."
    )
    registry_call_timeout_s: float = Field(default=10.0, gt=0, le=600, description="Timeout of one registry call.")
    kv_namespace: str = Field(
        default="solanalm-network", min_length=1, description="Ray GCS internal-KV namespace of registry state."
    )
    persist_interval_s: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="Counter updates are written to the KV at most this often (membership changes at once).",
    )
    challenge_ttl_s: float = Field(default=120.0, ge=5, le=3600, description="Lifetime of a join challenge.")
    label_prefix: str = Field(
        default="solanalm.io", min_length=1, description="Prefix of SolanaLM's Ray node labels (wallet, region...)."
    )
    join_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="How long `node join` waits for its Ray node to appear."
    )
    drain_timeout_s: float = Field(
        default=120.0, ge=0, le=86_400, description="How long `node leave` waits for its stages to move away."
    )
    verification_fraction: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Fraction of sequences whose provider stages are audited (re-executed on the head).",
    )
    verification: VerificationSection = Field(
        default_factory=VerificationSection, description="What audits of served traffic keep."
    )
    reputation: ReputationSection = Field(default_factory=ReputationSection, description="Reputation rule.")
    routing: RoutingWeights = Field(default_factory=RoutingWeights, description="Request-router weights.")
    placement: PlacementSection = Field(default_factory=PlacementSection, description="Stage placement.")
    providers: ProvidersSection = Field(
        default_factory=ProvidersSection, description="Providers registered over HTTP (outside the Ray cluster)."
    )

    @property
    def provider_ttl_s(self) -> float:
        """Seconds without a heartbeat after which a provider is dead (`providers.heartbeat_ttl_s`)."""
        return self.providers.heartbeat_ttl_s
