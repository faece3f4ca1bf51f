"""The registry's typed records: what a provider node offers and what the network knows about it.

Two kinds of record share one table: `ray` nodes joined the operator's Ray cluster (`solanalm node join`,
keyed by Ray node id, health from Ray's node table); `provider` records are stage hosts outside the cluster
that registered over the gateway's HTTP API (`solanalm provider serve`, keyed `provider-<id>`, health from
their heartbeats). Secrets (session token hash, link token) are never part of a record: the registry keeps
them apart, so nothing that lists records can leak them.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Health = Literal["alive", "draining", "dead"]
RecordKind = Literal["ray", "provider"]


@dataclass(frozen=True, slots=True)
class NodeCapabilities:
    """What a node offers. Ray's own resource view overrides the claimed CPU, GPU and memory at join."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0
    memory_bytes: int = 0
    gpu_memory_bytes: int = 0
    throughput_gflops: float = 0.0  # measured at join (dense matmul), a relative speed for placement
    accelerator: str | None = None

    @property
    def weight_memory_bytes(self) -> int:
        """Memory that holds a stage's weights: the GPU's when there is one, else RAM."""
        return self.gpu_memory_bytes if self.num_gpus > 0 and self.gpu_memory_bytes > 0 else self.memory_bytes


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One provider node, keyed by Ray node id (kind "ray") or `provider-<id>` (kind "provider": `endpoint`
    host:port of its stage host, `cert_pem` the TLS certificate it proved, `models` it serves, `last_seen`
    its last heartbeat in unix seconds). Counters only grow; reputation is in [0, 1]."""

    node_id: str
    wallet: str
    region: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: NodeCapabilities = field(default_factory=NodeCapabilities)
    verified: bool = True
    health: Health = "alive"
    draining: bool = False
    joined_at: float = 0.0
    requests_served: int = 0
    failures: int = 0
    verifications_passed: int = 0
    verifications_failed: int = 0
    latency_ewma_s: float | None = None
    reputation: float = 0.5
    kind: RecordKind = "ray"
    endpoint: str = ""
    cert_pem: str = ""
    models: tuple[str, ...] = ()
    last_seen: float = 0.0

    @property
    def success_rate(self) -> float:
        """Laplace-smoothed (s + 1) / (s + f + 2): one half with no history, never exactly 0 or 1."""
        return (self.requests_served + 1) / (self.requests_served + self.failures + 2)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NodeRecord":
        values = dict(data)
        values["capabilities"] = NodeCapabilities(**values.get("capabilities", {}))
        values["labels"] = dict(values.get("labels") or {})
        values["models"] = tuple(values.get("models") or ())
        return cls(**values)
