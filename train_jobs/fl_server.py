"""The Flower ServerApp: FedAvg over LoRA adapters, rewards per round, centralised evaluation.

`RewardingFedAvg` is FedAvg that also remembers whom it selected, and after aggregating a round
records a reward per selected wallet (proportional to examples trained, zero for clients that
dropped out) through a `RewardSink`. Round and per-client times and each client's cumulative
epsilon are kept for the run summary.
"""

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy

from train_jobs import metrics as train_metrics
from train_jobs.checkpoint import write_privacy
from train_jobs.config import FederatedJob
from train_jobs.fl_client import build_lora_model, held_out_set
from train_jobs.protocol import (
    JsonlRewardSink,
    RewardSink,
    RewardSinkError,
    RoundReward,
    round_rewards,
)
from train_jobs.task import evaluate, load_trainable_state, trainable_state

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


@dataclass
class RoundStats:
    """One round as the coordinator saw it."""

    round: int
    selected: list[str]
    completed: list[str]
    dropped: list[str]
    round_time_s: float
    client_time_s: dict[str, float]
    examples: dict[str, int]
    client_epsilon: dict[str, float]
    round_epsilon: dict[str, float]
    train_loss: float | None
    eval_loss: float | None = None


@dataclass
class FederatedSummary:
    """Everything the run measured; written to `summary.json` next to the adapter."""

    job: str
    eval_loss_before: float | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)
    adapter_dir: str | None = None

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SUMMARY_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


def privacy_report(job: FederatedJob) -> dict[str, Any]:
    """The privacy parameters in use (printed at start, stored with the checkpoint)."""
    return {
        "dp_sgd": job.privacy.model_dump(),
        "server_side_dp": job.server_dp.model_dump(),
        "accountant": "rdp (opacus), cumulative per client across rounds",
        "sampling": "poisson",
    }


class RewardingFedAvg(FedAvg):
    """FedAvg that records per-wallet rewards and per-round timings."""

    def __init__(
        self,
        job: FederatedJob,
        wallets: dict[int, str],
        sink: RewardSink,
        lamports_per_example: int,
        summary: FederatedSummary,
        fallback_path: Path | None = None,
    ) -> None:
        super().__init__(
            fraction_train=job.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=job.min_train_clients,
            min_available_nodes=job.min_available_clients,
        )
        self.job, self.wallets, self.sink = job, wallets, sink
        self.lamports_per_example = lamports_per_example
        self.run_summary = summary
        self.fallback_sink = JsonlRewardSink(fallback_path or Path("rewards.pending.jsonl"))
        self._selected: dict[int, list[int]] = {}
        self._started: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._selected[server_round] = [message.metadata.dst_node_id for message in messages]
        self._started[server_round] = time.perf_counter()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        stats = self._round_stats(server_round, replies, metrics)
        self.run_summary.rounds.append(stats)
        rewards = round_rewards(self.job.name, server_round, stats.selected, stats.examples, self.lamports_per_example)
        self.record_rewards(server_round, rewards)
        max_epsilon = max(stats.client_epsilon.values(), default=0.0)
        train_metrics.record_round(self.job.name, stats.round_time_s, max_epsilon, len(stats.dropped))
        logger.info(
            "round %d: %d/%d clients finished in %.1f s, max epsilon %.3f",
            server_round,
            len(stats.completed),
            len(stats.selected),
            stats.round_time_s,
            max(stats.client_epsilon.values(), default=0.0),
        )
        return arrays, metrics

    def record_rewards(self, server_round: int, rewards: list[RoundReward]) -> None:
        """Send to the sink; if it fails, keep the records in the pending JSONL and train on."""
        try:
            self.sink.record(rewards)
        except RewardSinkError:
            logger.exception(
                "reward sink failed for round %d; records kept in %s",
                server_round,
                self.fallback_sink.path,
            )
            self.fallback_sink.record(rewards)

    def _round_stats(self, server_round: int, replies: list[Message], metrics: MetricRecord | None) -> RoundStats:
        selected = [self._wallet(node) for node in self._selected.get(server_round, [])]
        examples, times, eps, round_eps = {}, {}, {}, {}
        for reply in replies:
            if reply.has_error():
                continue
            wallet = self._wallet(reply.metadata.src_node_id)
            record = reply.content["metrics"]
            examples[wallet] = int(_number(record, "num-examples"))
            times[wallet] = _number(record, "train-time-s")
            eps[wallet] = _number(record, "epsilon")
            round_eps[wallet] = _number(record, "round-epsilon")
        return RoundStats(
            round=server_round,
            selected=selected,
            completed=sorted(examples),
            dropped=[w for w in selected if w not in examples],
            round_time_s=time.perf_counter() - self._started.get(server_round, time.perf_counter()),
            client_time_s=times,
            examples=examples,
            client_epsilon=eps,
            round_epsilon=round_eps,
            train_loss=_number(metrics, "train-loss") if metrics and "train-loss" in metrics else None,
        )

    def _wallet(self, node_id: int) -> str:
        return self.wallets.get(node_id, f"unregistered-node-{node_id}")


def _number(record: object, key: str) -> float:
    value = record[key] if isinstance(record, MetricRecord) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"client metric {key!r} is not a number: {value!r}")
    return float(value)


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} clients connected within {timeout_s} s")
        time.sleep(0.5)


def register_clients(grid: Grid, timeout_s: float) -> dict[int, str]:
    """Ask every connected node for its wallet (so dropped clients are named in rewards)."""
    node_ids = list(grid.get_node_ids())
    queries = [
        Message(
            RecordDict({"config": ConfigRecord({})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    wallets = {}
    for reply in grid.send_and_receive(queries, timeout=timeout_s):
        if not reply.has_error():
            wallets[reply.metadata.src_node_id] = str(reply.content["identity"]["wallet"])  # type: ignore[index]
    logger.info("registered %d/%d clients", len(wallets), len(node_ids))
    return wallets


def _wrap_server_dp(job: FederatedJob, strategy: Strategy, sampled: int) -> Strategy:
    if not job.server_dp.enabled:
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=job.server_dp.noise_multiplier,
        clipping_norm=job.server_dp.clipping_norm,
        num_sampled_clients=sampled,
    )


def build_server_app(job: FederatedJob, sink: RewardSink, lamports_per_example: int, out_dir: Path) -> ServerApp:
    """A ServerApp bound to `job`; writes adapter/, privacy.json and summary.json to `out_dir`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = FederatedSummary(job=job.name, privacy=privacy_report(job))
        logger.info("privacy parameters: %s", json.dumps(summary.privacy))
        _wait_for_nodes(grid, job.min_available_clients, job.round_timeout_s)
        wallets = register_clients(grid, job.round_timeout_s)
        model = build_lora_model(job)
        held_out = held_out_set(job)

        def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            load_trainable_state(model, arrays.to_torch_state_dict())
            loss = evaluate(model, held_out)
            if server_round == 0:
                summary.eval_loss_before = loss
            elif summary.rounds:
                summary.rounds[-1].eval_loss = loss
            return MetricRecord({"eval-loss": loss})

        fedavg = RewardingFedAvg(job, wallets, sink, lamports_per_example, summary, out_dir / "rewards.pending.jsonl")
        sampled = max(int(job.num_clients * job.fraction_train), job.min_train_clients)
        strategy = _wrap_server_dp(job, fedavg, sampled)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(trainable_state(model)),
            num_rounds=job.num_rounds,
            timeout=job.round_timeout_s,
            evaluate_fn=central_eval,
        )
        load_trainable_state(model, result.arrays.to_torch_state_dict())
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir)
        write_privacy(adapter_dir, {**summary.privacy, "spent": _spent(summary)})
        summary.adapter_dir = str(adapter_dir)
        summary.write(out_dir)

    return app


def _spent(summary: FederatedSummary) -> dict[str, Any]:
    cumulative: dict[str, float] = {}
    for stats in summary.rounds:
        cumulative.update(stats.client_epsilon)
    delta = summary.privacy["dp_sgd"]["delta"]
    return {
        "epsilon_by_wallet": cumulative,
        "max_epsilon": max(cumulative.values(), default=0.0),
        "delta": delta,
    }
