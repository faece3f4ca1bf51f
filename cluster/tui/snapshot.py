"""What `solanalm tui` shows, as small frozen dataclasses, and the pure maths over them (no Ray, no Textual).

A `SnapshotSource` reads one `Snapshot` of the network (source.py reads a live cluster; tests pass a fake);
the app renders it. Rates are differences of monotonic counters between two snapshots. Beside it, a
`LogSource` (new JSON log entries) and a `TrainingSource` (jobs, rounds, rewards) feed the other two views.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from cluster.observability.logs import LogEntry

# Counters the gateway exports through Ray's Prometheus endpoint (serve_apps/metrics.py); summed over every
# series and node. Ray prefixes application metrics with "ray_".
REQUESTS_METRICS = ("solanalm_requests_total", "ray_solanalm_requests_total")
TOKENS_METRICS = ("solanalm_completion_tokens_total", "ray_solanalm_completion_tokens_total")


@dataclass(frozen=True, slots=True)
class NodeView:
    """A Ray node, with its provider record when the registry knows it."""

    node_id: str
    wallet: str | None
    region: str
    hardware: str  # "cpu", "gpu" or the accelerator type
    health: str  # alive | draining | dead
    reputation: float | None
    cpus: float
    gpus: float
    requests_served: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class StageView:
    """One stage actor of one pipeline (replica): its layers and the node (and wallet) it runs on."""

    model: str
    replica: str
    index: int
    layers: str
    node_id: str | None  # None: the stage did not answer
    wallet: str | None = None


@dataclass(frozen=True, slots=True)
class PipelineView:
    """A served model: its replicas' stages, queue and running sequences (one replica's view)."""

    model: str
    stages: tuple[StageView, ...]
    queue_depth: int | None = None
    running: int | None = None

    @property
    def replicas(self) -> int:
        return len({s.replica for s in self.stages})


@dataclass(frozen=True, slots=True)
class EarningView:
    """A provider wallet's unpaid earnings (payments ledger, in the asset's smallest unit)."""

    wallet: str
    unpaid: int | None
    asset: str = ""
    nodes: int = 0


@dataclass(frozen=True, slots=True)
class Counters:
    """Monotonic totals at `at_s` (monotonic clock); None where the cluster does not expose one."""

    at_s: float
    requests: float | None = None
    tokens: float | None = None
    steps: float | None = None  # engine decode steps summed over pipelines (a floor of tokens generated)


@dataclass(frozen=True, slots=True)
class Rates:
    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    steps_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    nodes: tuple[NodeView, ...]
    pipelines: tuple[PipelineView, ...]
    earnings: tuple[EarningView, ...]
    counters: Counters
    notes: tuple[str, ...] = field(default_factory=tuple)  # what could not be read, shown to the operator


class SnapshotSource(Protocol):
    """Reads the network once (blocking; the app calls it off the UI thread)."""

    def read(self) -> Snapshot: ...


def rates_between(before: Counters | None, after: Counters) -> Rates:
    """Per-second rates of each counter; None when either side lacks it, no time passed, or it went back
    (a restarted replica resets its counters)."""
    if before is None or after.at_s <= before.at_s:
        return Rates()
    elapsed = after.at_s - before.at_s

    def rate(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b < a else (b - a) / elapsed

    return Rates(
        rate(before.requests, after.requests), rate(before.tokens, after.tokens), rate(before.steps, after.steps)
    )


def sum_metrics(exposition: Iterable[str], names: Iterable[str]) -> float | None:
    """The sum of every sample named in `names` over Prometheus text expositions; None when none has one."""
    wanted, total, seen = set(names), 0.0, False
    for text in exposition:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    total += sample.value
                    seen = True
    return total if seen else None


def earnings_by_wallet(nodes: Iterable[NodeView], unpaid: Mapping[str, tuple[int, str] | None]) -> list[EarningView]:
    """One row per provider wallet: its node count and unpaid earnings (None: payments unreachable)."""
    counts: dict[str, int] = {}
    for node in nodes:
        if node.wallet:
            counts[node.wallet] = counts.get(node.wallet, 0) + 1
    rows = []
    for wallet, count in sorted(counts.items()):
        amount = unpaid.get(wallet)
        rows.append(EarningView(wallet, amount[0] if amount else None, amount[1] if amount else "", count))
    return rows


def format_rate(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.2f} {unit}"


class LogSource(Protocol):
    """The cluster's JSON log entries appended since the last call, oldest first (blocking)."""

    def read_new(self) -> list[LogEntry]: ...


@dataclass(frozen=True, slots=True)
class JobView:
    """A training job on Ray's job server: its status and the last line of its log that reports progress."""

    job_id: str
    kind: str
    status: str
    duration_s: float | None
    progress: str = ""


@dataclass(frozen=True, slots=True)
class RoundView:
    """One federated round of a run (its summary.json): clients, losses, the highest client ε, rewards paid."""

    run: str
    round: int
    completed: int
    dropped: int
    train_loss: float | None
    eval_loss: float | None
    epsilon: float | None
    rewards_lamports: int


@dataclass(frozen=True, slots=True)
class RewardView:
    """What one client wallet earned over the runs shown: rounds completed and lamports."""

    wallet: str
    rounds: int
    lamports: int


@dataclass(frozen=True, slots=True)
class TrainingSnapshot:
    jobs: tuple[JobView, ...] = ()
    rounds: tuple[RoundView, ...] = ()
    rewards: tuple[RewardView, ...] = ()
    notes: tuple[str, ...] = ()


class TrainingSource(Protocol):
    """Reads training jobs and run summaries once (blocking)."""

    def read(self) -> TrainingSnapshot: ...


def rounds_from(summaries: Iterable[Mapping[str, Any]]) -> list[RoundView]:
    """Every round of every run summary (FederatedSummary as written to summary.json), in order."""
    rows = []
    for summary in summaries:
        run = str(summary.get("run") or summary.get("job") or "?")
        for r in summary.get("rounds") or []:
            epsilons = [float(e) for e in (r.get("client_epsilon") or {}).values() if e is not None]
            rows.append(
                RoundView(
                    run,
                    int(r.get("round", 0)),
                    len(r.get("completed") or []),
                    len(r.get("dropped") or []),
                    _float_or_none(r.get("train_loss")),
                    _float_or_none(r.get("eval_loss")),
                    max(epsilons) if epsilons else None,
                    sum(int(v) for v in (r.get("rewards_lamports") or {}).values()),
                )
            )
    return rows


def rewards_from(summaries: Iterable[Mapping[str, Any]]) -> list[RewardView]:
    """Per wallet: rounds rewarded and lamports, over every round of every summary; largest first."""
    rounds: dict[str, int] = {}
    lamports: dict[str, int] = {}
    for summary in summaries:
        for r in summary.get("rounds") or []:
            for wallet, amount in (r.get("rewards_lamports") or {}).items():
                rounds[wallet] = rounds.get(wallet, 0) + 1
                lamports[wallet] = lamports.get(wallet, 0) + int(amount)
    return [RewardView(w, rounds[w], lamports[w]) for w in sorted(lamports, key=lambda w: (-lamports[w], w))]


def jobs_from(rows: Iterable[Mapping[str, Any]]) -> list[JobView]:
    """Job rows as `TrainingJobs.metrics()` returns them (status, duration, progress lines)."""
    return [
        JobView(
            str(row.get("job_id") or "?"),
            str(row.get("kind") or "-"),
            str(row.get("status") or "?"),
            _float_or_none(row.get("duration_s")),
            (row.get("progress") or [""])[-1],
        )
        for row in rows
    ]


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
