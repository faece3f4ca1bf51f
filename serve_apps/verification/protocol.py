"""Typed messages of verification: what the gateway asks a replica to trace, and what comes back."""

from dataclasses import dataclass
from typing import Any, Literal

from serve_apps.protocol import GenerateRequest


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """Trace a token history through a pipeline without its KV cache.

    Either `token_ids` (the exact history, as traced by another replica) or `request` + `completion`
    (the served request's prompt, tokenized by the replica, followed by the completion's tokens)."""

    request_id: str
    token_ids: tuple[int, ...] | None = None
    request: GenerateRequest | None = None
    completion: str = ""
    max_tokens: int = 128  # the history is cut to its first max_tokens tokens
    fingerprint_dims: int = 8
    keep_inputs: bool = False  # also return each stage's input (token ids or hidden states) for a referee

    def __post_init__(self) -> None:
        if (self.token_ids is None) == (self.request is None):
            raise ValueError("exactly one of token_ids and request must be set")
        if self.max_tokens < 1 or self.fingerprint_dims < 1:
            raise ValueError("max_tokens and fingerprint_dims must be >= 1")


@dataclass(frozen=True, slots=True)
class StageTrace:
    """One stage's fingerprint, and who computed it."""

    index: int
    layer_start: int
    layer_end: int
    node_id: str
    wallet: str | None
    fingerprint: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class TraceResult:
    """A pipeline's trace of one token history (`error` set when it could not trace)."""

    replica_id: str
    model: str
    model_dir: str
    dtype: str
    token_ids: tuple[int, ...]
    stages: tuple[StageTrace, ...]
    inputs: tuple[Any, ...] = ()  # torch tensors, stage i's input, when keep_inputs was set
    error: str | None = None


Outcome = Literal["passed", "failed", "inconclusive"]


@dataclass(frozen=True, slots=True)
class Culprit:
    """A stage whose output disagrees with the reference: its replica, node and provider wallet."""

    replica_id: str
    stage_index: int
    node_id: str
    wallet: str | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one spot-check; `served_culprits` are the culprits on the served pipeline."""

    outcome: Outcome
    detail: str
    stage_index: int | None = None
    culprits: tuple[Culprit, ...] = ()
    served_replica: str = ""

    @property
    def served_culprits(self) -> tuple[Culprit, ...]:
        return tuple(c for c in self.culprits if c.replica_id == self.served_replica)
