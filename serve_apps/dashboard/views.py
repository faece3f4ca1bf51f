"""The dashboard's view models: pure functions and small dataclasses over what the gateway reads (metric
taps, PipelineInfo, registry records, payments answers, training output). No FastAPI, no Ray: unit-tested.
"""

import hashlib
import hmac
import json
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.tui.snapshot import Counters, rates_between

WINDOW_S = 10.0  # rates and latency means are over the last this many seconds
HISTORY_POINTS = 120  # points kept per chart series (one per SSE tick)


@dataclass
class ModelFigures:
    """Monotonic totals of one model, as the gateway's metric taps saw them, and recent latencies."""

    requests: float = 0.0
    tokens: float = 0.0
    ttft_s: deque[tuple[float, float]] = field(default_factory=deque)  # (monotonic time, seconds)
    tpot_s: deque[tuple[float, float]] = field(default_factory=deque)


class LiveStats:
    """Fed by `tap(name, method, value, tags)` (serve_apps.metrics.TAPS); `figures(now)` gives per-model
    requests/s and tokens/s (differences of totals between two calls, via the TUI's `rates_between`) and
    the mean TTFT and time per output token over the last WINDOW_S."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.models: dict[str, ModelFigures] = {}
        self._last: dict[str, Counters] = {}

    def tap(self, name: str, method: str, value: float, tags: Mapping[str, str]) -> None:
        model = tags.get("model")
        if not model:
            return
        figures = self.models.setdefault(model, ModelFigures())
        now = self._clock()
        if name == "solanalm_requests" and method == "inc" and tags.get("status") == "ok":
            figures.requests += value
        elif name == "solanalm_completion_tokens" and method == "inc":
            figures.tokens += value
        elif name == "solanalm_ttft_seconds":
            figures.ttft_s.append((now, value))
        elif name == "solanalm_time_per_output_token_seconds":
            figures.tpot_s.append((now, value))

    def figures(self) -> dict[str, dict[str, float | None]]:
        """Per model: requests_per_s, tokens_per_s, ttft_ms, tpot_ms (None: no sample in the window)."""
        now = self._clock()
        out: dict[str, dict[str, float | None]] = {}
        for model, figures in self.models.items():
            counters = Counters(now, figures.requests, figures.tokens)
            rates = rates_between(self._last.get(model), counters)
            self._last[model] = counters
            out[model] = {
                "requests_total": figures.requests,
                "tokens_total": figures.tokens,
                "requests_per_s": rates.requests_per_s,
                "tokens_per_s": rates.tokens_per_s,
                "ttft_ms": _recent_mean_ms(figures.ttft_s, now),
                "tpot_ms": _recent_mean_ms(figures.tpot_s, now),
            }
        return out


def _recent_mean_ms(samples: deque[tuple[float, float]], now: float) -> float | None:
    while samples and samples[0][0] < now - WINDOW_S:
        samples.popleft()
    return 1000 * sum(v for _, v in samples) / len(samples) if samples else None


@dataclass(frozen=True, slots=True)
class PipelineFigures:
    """One replica's pipeline as its describe() answered: queue, resident sequences (one KV slot each)."""

    model: str
    replica: str
    queue_depth: int
    running: int
    kv_slots_total: int | None
    steps: int
    stages: tuple[dict[str, Any], ...]
    num_layers: int = 0


def pipeline_figures(info: Any) -> PipelineFigures:
    """From a PipelineInfo (duck-typed: the gateway's backend answers it); the KV slots are the fewest any
    stage holds (each stage keeps one cache slot per resident sequence)."""
    kv_slots_total = min((s.kv_slots for s in info.stages), default=None)
    stages = tuple(
        {"index": s.stage_index, "layers": (s.layer_start, s.layer_end), "node_id": s.node_id, "pid": s.pid}
        for s in info.stages
    )
    return PipelineFigures(
        info.model, info.replica_id, info.queue_depth, info.running, kv_slots_total, info.steps, stages, info.num_layers
    )


def fmt(value: Any, digits: int = 1) -> str:
    """A figure for a table cell: '-' when unknown (None, NaN, missing)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def series_point(t: float, figures: Mapping[str, Mapping[str, float | None]]) -> dict[str, Any]:
    """One chart point: time and the sums over models (what the live chart draws)."""

    def total(key: str) -> float:
        return sum(f.get(key) or 0.0 for f in figures.values())

    def mean(key: str) -> float | None:
        values = [v for f in figures.values() if (v := f.get(key)) is not None]
        return sum(values) / len(values) if values else None

    return {
        "t": t,
        "requests_per_s": total("requests_per_s"),
        "tokens_per_s": total("tokens_per_s"),
        "ttft_ms": mean("ttft_ms"),
        "tpot_ms": mean("tpot_ms"),
    }


# ---- network ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerBar:
    """One stage's rectangle in a pipeline's SVG bar: x and width in the bar's own units (0..width)."""

    stage: int
    layer_start: int
    layer_end: int  # exclusive
    x: float
    width: float
    node_id: str | None
    wallet: str | None


def layer_bars(
    stages: Iterable[Mapping[str, Any]], num_layers: int, width: float, wallets: Mapping[str, str] | None = None
) -> list[LayerBar]:
    """Each stage's share of the model's layers, laid left to right over `width` (ValueError for a stage
    outside 0..num_layers: the replica's describe would be wrong)."""
    if num_layers <= 0:
        raise ValueError("a model has at least one layer")
    bars = []
    for stage in sorted(stages, key=lambda s: s["index"]):
        start, end = stage["layers"]
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"stage {stage['index']} layers {start}..{end} outside 0..{num_layers}")
        node = stage.get("node_id")
        bars.append(
            LayerBar(
                stage["index"],
                start,
                end,
                width * start / num_layers,
                width * (end - start) / num_layers,
                node,
                (wallets or {}).get(node) if node else None,
            )
        )
    return bars


def provider_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Registry records (NodeRecord.to_json or the public view) as table rows, healthiest first."""
    order = {"alive": 0, "draining": 1, "dead": 2}
    rows = []
    for r in records:
        caps = r.get("capabilities") or {}
        hardware = (caps.get("accelerator") or ("gpu" if caps.get("num_gpus") else "cpu")) if caps else "-"
        rows.append(
            {
                "node_id": r.get("node_id", ""),
                "wallet": r.get("wallet", ""),
                "region": r.get("region") or "-",
                "hardware": f"{hardware} · {caps.get('num_cpus', '?')} CPU" if caps else hardware,
                "health": r.get("health", "?"),
                "reputation": r.get("reputation"),
                "verified": r.get("verified"),
                "verifications": f"{r.get('verifications_passed', 0)} ok / {r.get('verifications_failed', 0)} failed",
                "served": r.get("requests_served", 0),
                "failures": r.get("failures", 0),
            }
        )
    return sorted(rows, key=lambda row: (order.get(row["health"], 3), row["node_id"]))


# ---- money -----------------------------------------------------------------------------------------------


def money_wallets(unpaid: Mapping[str, int], *known: Iterable[str | None]) -> list[str]:
    """Every wallet the money view lists: those with unpaid earnings and the known ones (providers, the
    operator, wallets paid before), each once, sorted."""
    wallets = set(unpaid)
    for group in known:
        wallets.update(w for w in group if w)
    return sorted(wallets)


def payout_split(payouts: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(pending, paid) payout lines: paid once its batch is confirmed on chain."""
    pending: list[Mapping[str, Any]] = []
    paid: list[Mapping[str, Any]] = []
    for line in payouts:
        (paid if line.get("state") == "confirmed" else pending).append(line)
    return pending, paid


# ---- training --------------------------------------------------------------------------------------------


def fl_rounds(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A federated run's summary.json rounds as rows: round, losses, ε per client, rewards per wallet."""
    rows = []
    for r in summary.get("rounds", []):
        rows.append(
            {
                "round": r.get("round"),
                "train_loss": r.get("train_loss"),
                "eval_loss": r.get("eval_loss"),
                "client_epsilon": dict(r.get("client_epsilon") or {}),
                "rewards": dict(r.get("rewards_lamports") or {}),
                "completed": len(r.get("completed") or []),
                "dropped": len(r.get("dropped") or []),
            }
        )
    return rows


def rewards_by_wallet(rounds: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Total training rewards per wallet over a run's rounds."""
    totals: dict[str, int] = {}
    for row in rounds:
        for wallet, amount in row["rewards"].items():
            totals[wallet] = totals.get(wallet, 0) + int(amount)
    return dict(sorted(totals.items()))


def checkpoint_steps(snapshot: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(step, loss) of each checkpoint in Ray Train's checkpoint_manager_snapshot.json (Train v2 keeps the
    metrics reported with each checkpoint there), in step order."""
    points = {}
    for result in snapshot.get("checkpoint_results") or []:
        metrics = result.get("metrics") or {}
        if isinstance(metrics.get("loss"), int | float) and isinstance(metrics.get("step"), int):
            points[metrics["step"]] = float(metrics["loss"])
    return sorted(points.items())


def train_steps(result_lines: Iterable[str]) -> list[tuple[int, float]]:
    """(step, loss) of a Ray Train run's result.json (one JSON report per line); lines without both skipped."""
    points = []
    for line in result_lines:
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and isinstance(report.get("loss"), int | float) and "step" in report:
            points.append((int(report["step"]), float(report["loss"])))
    return points


# ---- sessions --------------------------------------------------------------------------------------------


def sign(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def operator_session(key: bytes, expires_at: int) -> str:
    """The operator's session cookie: its expiry, signed (stateless: any gateway replica with the same
    operator token accepts it)."""
    return f"{expires_at}.{sign(key, f'operator:{expires_at}')}"


def operator_session_valid(key: bytes, cookie: str | None, now: float) -> bool:
    expires, _, mac = (cookie or "").partition(".")
    if not expires.isdigit() or int(expires) < now:
        return False
    return hmac.compare_digest(mac, sign(key, f"operator:{expires}"))


def csrf_token(key: bytes, session: str | None) -> str:
    """The CSRF token of a session (the form field every POST carries): bound to the session cookie, so a
    page of another site, which cannot read the cookie, cannot forge it."""
    return sign(key, f"csrf:{session or ''}")


def csrf_valid(key: bytes, session: str | None, given: str | None) -> bool:
    return bool(session) and bool(given) and hmac.compare_digest(csrf_token(key, session), given or "")
