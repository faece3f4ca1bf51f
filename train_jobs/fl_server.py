"""The Flower ServerApp: FedAvg over LoRA adapters, rewards per round, centralised evaluation.

At start the server registers every node: it assigns each one a partition of the job's data and sends
it a fresh nonce, which the client signs with its wallet's key (`train_jobs.wallets`); only wallets
proven that way are paid. `RewardingFedAvg` is FedAvg that also remembers whom it selected, and after
each round records a reward per proven wallet through a `RewardSink`: the examples it credits are the
server's own count (the node's assigned partition, at most `max_steps` batches of it; a client that
reports fewer gets what it reported, one that reports more gets no more; FedAvg weighs updates by the
credited count too), times the rate, the round scaled down to `reward_budget_per_round_lamports`.
A client that returned no update is paid nothing. Round and per-client times and each client's
cumulative epsilon are kept for the run summary, with the nodes whose wallet was not proven.
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

from cluster.network.wallet import ProofError
from train_jobs import metrics as train_metrics
from train_jobs.checkpoint import write_privacy
from train_jobs.config import FederatedJob
from train_jobs.fl_client import build_lora_model, challenge_to_record, held_out_set, partition_sizes
from train_jobs.fl_secagg import SecAggRounds, run_secagg_rounds
from train_jobs.privacy import central_epsilon as central_dp_epsilon
from train_jobs.protocol import (
    JsonlRewardSink,
    RewardSink,
    RewardSinkError,
    RoundReward,
    assigned_examples,
    credited_examples,
    round_rewards,
)
from train_jobs.task import evaluate, load_trainable_state, trainable_state
from train_jobs.wallets import RewardWalletChallenge, issue_challenge, verify_claim

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
    examples: dict[str, int]  # credited by the server (what rewards and FedAvg weights use)
    client_epsilon: dict[str, float]
    round_epsilon: dict[str, float]
    train_loss: float | None
    eval_loss: float | None = None
    reported_examples: dict[str, int] = field(default_factory=dict)  # what the clients said
    rewards_lamports: dict[str, int] = field(default_factory=dict)
    unpaid: list[str] = field(default_factory=list)  # completed, but the wallet is not proven
    over_budget: list[str] = field(default_factory=list)  # not selected: one more round would pass max_epsilon
    central_epsilon: float | None = None  # server-side DP (server_dp) spent after this round, client level
    secure_aggregation: bool = False  # SecAgg+: the server saw only the masked sum of the updates
    aggregated: bool = True  # False: SecAgg+ could not rebuild the sum (too many dropouts); nobody is paid


@dataclass(frozen=True)
class Registration:
    """One node as registration left it: its partition, and its wallet if the node proved it."""

    node_id: int
    partition: int
    wallet: str | None = None
    claimed_wallet: str | None = None
    unproven_reason: str | None = None

    @property
    def label(self) -> str:
        """How the summary names the node: its proven wallet, else `unproven-node-<id>`."""
        return self.wallet or f"unproven-node-{self.node_id}"


@dataclass
class FederatedSummary:
    """Everything the run measured; written to `summary.json` next to the adapter."""

    job: str
    eval_loss_before: float | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    unproven: list[dict[str, Any]] = field(default_factory=list)  # node, claimed_wallet, reason: never paid
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
        "secure_aggregation": job.secure_aggregation.model_dump(),
        "accountant": "rdp (opacus), cumulative per client across rounds",
        "sampling": "poisson",
    }


class RewardingFedAvg(FedAvg):
    """FedAvg that records per-wallet rewards (server-counted, budgeted) and per-round timings."""

    def __init__(
        self,
        job: FederatedJob,
        registrations: dict[int, Registration],
        sink: RewardSink,
        lamports_per_example: int,
        summary: FederatedSummary,
        sizes: list[int],
        fallback_path: Path | None = None,
    ) -> None:
        super().__init__(
            fraction_train=job.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=job.min_train_clients,
            min_available_nodes=job.min_available_clients,
        )
        self.job, self.registrations, self.sink = job, registrations, sink
        self.lamports_per_example = lamports_per_example
        self.run_summary = summary
        self.sizes = sizes
        self.fallback_sink = JsonlRewardSink(fallback_path or Path("rewards.pending.jsonl"))
        self._selected: dict[int, list[int]] = {}
        self._started: dict[int, float] = {}
        self._over_budget: dict[int, list[str]] = {}
        self._epsilon: dict[int, tuple[float, float]] = {}  # node -> (cumulative, last round), as reported

    def within_budget(self, node: int) -> bool:
        """False when the node's reported spend plus one more round like its last would pass the budget."""
        budget = self.job.privacy.max_epsilon if self.job.privacy.enabled else None
        spent, last = self._epsilon.get(node, (0.0, 0.0))
        return budget is None or spent + last <= budget

    def select(self, server_round: int, node_ids: Iterable[int]) -> list[Registration]:
        """The registered nodes among `node_ids` that train this round (over-budget ones are left out)."""
        chosen = []
        for node in node_ids:
            registration = self.registrations.get(node)
            if registration is None:  # joined after registration: it has no partition to train
                continue
            if not self.within_budget(node):
                self._over_budget.setdefault(server_round, []).append(registration.label)
                continue
            chosen.append(registration)
        self._selected[server_round] = [registration.node_id for registration in chosen]
        self._started[server_round] = time.perf_counter()
        return chosen

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampled = super().configure_train(server_round, arrays, config, grid)
        node_ids = [message.metadata.dst_node_id for message in sampled]
        messages = []
        for registration in self.select(server_round, node_ids):
            node_config = ConfigRecord({**dict(config), "partition-id": registration.partition})
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            messages.append(Message(content, message_type=MessageType.TRAIN, dst_node_id=registration.node_id))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        metrics_by_node = [
            (reply.metadata.src_node_id, reply.content["metrics"]) for reply in replies if not reply.has_error()
        ]
        stats = self.round_stats(server_round, metrics_by_node)  # also credits each reply's num-examples
        arrays, metrics = super().aggregate_train(server_round, replies)
        train_loss = _number(metrics, "train-loss") if metrics and "train-loss" in metrics else None
        self.finish_round(stats, train_loss)
        return arrays, metrics

    def finish_round(self, stats: RoundStats, train_loss: float | None) -> None:
        """Record a finished round: its stats in the summary, one reward per selected proven wallet."""
        server_round = stats.round
        stats.train_loss = train_loss
        stats.over_budget = self._over_budget.get(server_round, [])
        if self.job.server_dp.enabled:
            stats.central_epsilon = central_dp_epsilon(self.job.server_dp, server_round, self.job.privacy.delta)
        self.run_summary.rounds.append(stats)
        rewards = self._rewards(server_round, stats)
        stats.rewards_lamports = {reward.wallet: reward.amount_lamports for reward in rewards}
        self.record_rewards(server_round, rewards)
        max_epsilon = max(stats.client_epsilon.values(), default=0.0)
        train_metrics.record_round(self.job.name, stats.round_time_s, max_epsilon, len(stats.dropped))
        logger.info(
            "round %d: %d/%d clients finished in %.1f s, max epsilon %.3f, %d unproven unpaid",
            server_round,
            len(stats.completed),
            len(stats.selected),
            stats.round_time_s,
            max_epsilon,
            len(stats.unpaid),
        )

    def record_rewards(self, server_round: int, rewards: list[RoundReward]) -> None:
        """Send to the sink; if it fails (or refuses the batch), keep the records in the pending JSONL."""
        try:
            self.sink.record(rewards)
        except RewardSinkError:
            logger.exception(
                "reward sink failed for round %d; records kept in %s",
                server_round,
                self.fallback_sink.path,
            )
            self.fallback_sink.record(rewards)

    def _rewards(self, server_round: int, stats: RoundStats) -> list[RoundReward]:
        proven = [self.registrations[node] for node in self._selected.get(server_round, [])]
        wallets = [r.wallet for r in proven if r.wallet is not None]
        examples = {wallet: count for wallet, count in stats.examples.items() if wallet in wallets}
        budget = self.job.reward_budget_per_round_lamports
        return round_rewards(self.job.name, server_round, wallets, examples, self.lamports_per_example, budget)

    def round_stats(self, server_round: int, replies: list[tuple[int, object]]) -> RoundStats:
        """The round from the (node id, metrics) of the nodes that returned an update."""
        selected = [self.registrations[node].label for node in self._selected.get(server_round, [])]
        examples: dict[str, int] = {}
        reported: dict[str, int] = {}
        times, eps, round_eps = {}, {}, {}
        for node, record in replies:
            registration = self.registrations.get(node)
            if registration is None or node not in self._selected.get(server_round, []):
                continue
            label = registration.label
            claimed = int(_number(record, "num-examples"))
            credited = credited_examples(claimed, self._assigned(registration))
            if isinstance(record, MetricRecord):  # FedAvg weighs the updates by the server's count too
                record["num-examples"] = credited
            reported[label] = reported.get(label, 0) + claimed
            examples[label] = examples.get(label, 0) + credited
            times[label] = _number(record, "train-time-s")
            eps[label] = _number(record, "epsilon")
            round_eps[label] = _number(record, "round-epsilon")
            self._epsilon[registration.node_id] = (eps[label], round_eps[label])
        return RoundStats(
            round=server_round,
            selected=selected,
            completed=sorted(examples),
            dropped=[label for label in selected if label not in examples],
            round_time_s=time.perf_counter() - self._started.get(server_round, time.perf_counter()),
            client_time_s=times,
            examples=examples,
            client_epsilon=eps,
            round_epsilon=round_eps,
            train_loss=None,
            reported_examples=reported,
            unpaid=sorted(label for label in examples if label.startswith("unproven-node-")),
        )

    def _assigned(self, registration: Registration) -> int:
        size = self.sizes[registration.partition] if registration.partition < len(self.sizes) else 0
        return assigned_examples(size, self.job.optim.max_steps, self.job.optim.batch_size)


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


def assign_partitions(node_ids: Iterable[int], num_partitions: int) -> dict[int, int]:
    """Partition i of the job's data to the i-th node (by node id); nodes beyond the partitions get none."""
    return {node: partition for partition, node in enumerate(sorted(node_ids)[:num_partitions])}


def check_claim(
    registration: Registration, issued: RewardWalletChallenge, identity: object, now: float
) -> Registration:
    """`registration` with its wallet if `identity` (the node's reply) proves it, else why not."""
    wallet = identity.get("wallet") if isinstance(identity, ConfigRecord) else None
    signature = identity.get("signature") if isinstance(identity, ConfigRecord) else None
    claimed = str(wallet) if wallet is not None else None
    try:
        verify_claim(issued, claimed or "", str(signature) if signature is not None else None, now)
    except ProofError as exc:
        return Registration(registration.node_id, registration.partition, None, claimed, str(exc))
    return Registration(registration.node_id, registration.partition, claimed, claimed)


def register_clients(grid: Grid, job: FederatedJob, timeout_s: float) -> dict[int, Registration]:
    """Assign every connected node a partition and ask it to prove its wallet by signing a fresh nonce.

    Every assigned node trains; only those whose signature verifies are paid (the others are logged).
    """
    now = time.time()
    assigned = assign_partitions(grid.get_node_ids(), job.num_clients)
    issued = {
        node: issue_challenge(job.name, node, partition, now, job.registration_ttl_s)
        for node, partition in assigned.items()
    }
    registrations = {
        node: Registration(node, partition, unproven_reason="no reply") for node, partition in assigned.items()
    }
    queries = [
        Message(
            RecordDict({"challenge": challenge_to_record(challenge)}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node, challenge in issued.items()
    ]
    for reply in grid.send_and_receive(queries, timeout=timeout_s):
        node = reply.metadata.src_node_id
        if node not in issued or reply.has_error():
            continue
        identity = reply.content.get("identity")
        registrations[node] = check_claim(registrations[node], issued.pop(node), identity, time.time())
    for registration in registrations.values():
        if registration.wallet is None:
            logger.warning(
                "node %d (partition %d) claims wallet %s without proof (%s): it will not be paid",
                registration.node_id,
                registration.partition,
                registration.claimed_wallet,
                registration.unproven_reason,
            )
    proven = sum(r.wallet is not None for r in registrations.values())
    logger.info("registered %d nodes, %d with a proven wallet", len(registrations), proven)
    return registrations


def _wrap_server_dp(job: FederatedJob, strategy: Strategy, sampled: int) -> Strategy:
    if not job.server_dp.enabled:
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=job.server_dp.noise_multiplier,
        clipping_norm=job.server_dp.clipping_norm,
        num_sampled_clients=sampled,
    )


def bind_to_key(registration: Registration, node_wallets: dict[int, str] | None) -> Registration:
    """On SuperNodes, a node is paid only to the wallet its authentication key is bound to."""
    if node_wallets is None or registration.wallet is None:
        return registration
    bound = node_wallets.get(registration.node_id)
    if bound == registration.wallet:
        return registration
    reason = f"wallet differs from the one the node's key is bound to ({bound})" if bound else "node key not bound"
    return Registration(registration.node_id, registration.partition, None, registration.claimed_wallet, reason)


def run_server(
    grid: Grid,
    job: FederatedJob,
    sink: RewardSink,
    lamports_per_example: int,
    out_dir: Path,
    node_wallets: dict[int, str] | None = None,
) -> FederatedSummary:
    """All rounds of `job` over the nodes `grid` reaches; writes adapter/, privacy.json, summary.json.

    `node_wallets` (Flower node id -> wallet bound to its auth key) is given on SuperNodes, whose data
    the server never sees: each node is credited at most `max_steps x batch_size` examples per round.
    Without it (simulation) nodes train the job's partitions and are credited at most their size.
    """
    summary = FederatedSummary(job=job.name, privacy=privacy_report(job))
    logger.info("privacy parameters: %s", json.dumps(summary.privacy))
    _wait_for_nodes(grid, job.min_available_clients, job.round_timeout_s)
    registrations = {
        node: bind_to_key(registration, node_wallets)
        for node, registration in register_clients(grid, job, job.round_timeout_s).items()
    }
    summary.unproven = [
        {"node": r.node_id, "claimed_wallet": r.claimed_wallet, "reason": r.unproven_reason}
        for r in registrations.values()
        if r.wallet is None
    ]
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

    cap = job.optim.max_steps * job.optim.batch_size
    sizes = partition_sizes(job) if node_wallets is None else [cap] * job.num_clients
    fedavg = RewardingFedAvg(
        job, registrations, sink, lamports_per_example, summary, sizes, out_dir / "rewards.pending.jsonl"
    )
    initial = ArrayRecord(trainable_state(model))
    if job.secure_aggregation.enabled:  # Flower's SecAgg+ workflow; selection and rewards stay fedavg's
        final = run_secagg_rounds(grid, job, SecAggRounds(fedavg, grid), initial, central_eval)
    else:
        sampled = max(int(job.num_clients * job.fraction_train), job.min_train_clients)
        strategy = _wrap_server_dp(job, fedavg, sampled)
        final = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=job.num_rounds,
            timeout=job.round_timeout_s,
            evaluate_fn=central_eval,
        ).arrays
    load_trainable_state(model, final.to_torch_state_dict())
    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    write_privacy(adapter_dir, {**summary.privacy, "spent": _spent(summary)})
    summary.adapter_dir = str(adapter_dir)
    summary.write(out_dir)
    return summary


def build_server_app(job: FederatedJob, sink: RewardSink, lamports_per_example: int, out_dir: Path) -> ServerApp:
    """A ServerApp bound to `job` (the simulation's); writes adapter/, privacy.json and summary.json."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, job, sink, lamports_per_example, out_dir)

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
