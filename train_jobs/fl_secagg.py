"""Secure aggregation rounds: Flower's SecAgg+ workflow driving `RewardingFedAvg`'s selection and rewards.

Flower 1.41 ships SecAgg+ only for its legacy server API: `SecAggPlusWorkflow` runs one round's four
stages (keys, key shares, masked vectors, unmasking) and calls a legacy `Strategy`'s `configure_fit`
and `aggregate_fit`. `SecAggRounds` is that Strategy, a thin adapter: who trains, what each node is
credited and what each wallet is paid stay `RewardingFedAvg`'s (the same code the plain rounds use);
the aggregation is the workflow's, which hands the strategy only the unmasked weighted mean (every
client's `FitRes.parameters` is replaced by it) and the clients' plain metrics. Each client weighs its
update by its examples, at most what a round credits (`fl_client._train_round_secagg`).

Rewards under SecAgg+ come from what the server can check: a node is paid only for a round whose sum
was rebuilt and only if its masked vector was in that sum, for the examples the server credits it
(the round's cap, never more than it reported), within the per-round budget. A round the workflow
could not rebuild (more dropouts than the threshold tolerates) keeps the previous adapter and pays
nobody.
"""

import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from train_jobs.config import FederatedJob, SecureAggregationSpec

logger = logging.getLogger(__name__)

EvaluateFn = Callable[[int, ArrayRecord], object]


class SecAggRounds(Strategy):
    """The legacy Strategy `SecAggPlusWorkflow` calls: selection and rewards are `rewarding`'s."""

    def __init__(self, rewarding: Any, grid: Grid) -> None:  # rewarding: fl_server.RewardingFedAvg
        self.rewarding, self.grid = rewarding, grid
        self.aggregated_rounds: set[int] = set()

    def sample(self, node_ids: Iterable[int]) -> list[int]:
        """FedAvg's sampling: `fraction_train` of the connected nodes, at least `min_train_clients`."""
        nodes = sorted(node_ids)
        job = self.rewarding.job
        count = min(len(nodes), max(int(len(nodes) * job.fraction_train), job.min_train_clients))
        return sorted(random.sample(nodes, count))

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        chosen = self.rewarding.select(server_round, self.sample(self.grid.get_node_ids()))
        return [
            (
                GridClientProxy(node_id=registration.node_id, grid=self.grid, run_id=0),
                FitIns(parameters, {"partition-id": registration.partition, "server-round": server_round}),
            )
            for registration in chosen
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """`results` carry the unmasked mean (the same Parameters in each) and each client's metrics."""
        replies = [(proxy.node_id, MetricRecord(dict(fitres.metrics))) for proxy, fitres in results]  # type: ignore[arg-type]
        stats = self.rewarding.round_stats(server_round, replies)
        stats.secure_aggregation = True
        self.rewarding.finish_round(stats, self._train_loss(results, stats.examples))
        self.aggregated_rounds.add(server_round)
        return (results[0][1].parameters if results else None), {}

    def _train_loss(self, results: list[tuple[ClientProxy, FitRes]], credited: dict[str, int]) -> float | None:
        """The clients' reported train losses, weighed by the examples the server credits them."""
        registrations = self.rewarding.registrations
        pairs = [
            (float(fitres.metrics["train-loss"]), credited.get(registrations[proxy.node_id].label, 0))
            for proxy, fitres in results
            if proxy.node_id in registrations and "train-loss" in fitres.metrics
        ]
        total = sum(weight for _, weight in pairs)
        return sum(loss * weight for loss, weight in pairs) / total if total else None

    def record_failed_round(self, server_round: int) -> None:
        """The workflow halted before unmasking: every selected node is recorded dropped and unpaid."""
        stats = self.rewarding.round_stats(server_round, [])
        stats.secure_aggregation, stats.aggregated = True, False
        self.rewarding.finish_round(stats, None)

    # The legacy Strategy's other duties are done elsewhere: the initial adapter and central
    # evaluation by `run_secagg_rounds`, no federated evaluation (fraction_evaluate is 0).
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def secagg_workflow(spec: SecureAggregationSpec, timeout_s: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow with the job's parameters (each stage waits at most `timeout_s`)."""
    return SecAggPlusWorkflow(
        num_shares=spec.num_shares,
        reconstruction_threshold=spec.reconstruction_threshold,
        max_weight=spec.max_weight,
        clipping_range=spec.clipping_range,
        quantization_range=spec.quantization_range,
        timeout=timeout_s,
    )


def named_arrays(names: list[str], record: ArrayRecord) -> ArrayRecord:
    """The workflow's unnamed adapter record (legacy Parameters) with the adapter's tensor names back."""
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    if len(arrays) != len(names):
        raise ValueError(f"aggregate has {len(arrays)} tensors, the adapter {len(names)}")
    return ArrayRecord({name: Array(np.asarray(array)) for name, array in zip(names, arrays, strict=True)})


def run_secagg_rounds(
    grid: Grid, job: FederatedJob, strategy: SecAggRounds, initial: ArrayRecord, evaluate_fn: EvaluateFn
) -> ArrayRecord:
    """`job.num_rounds` SecAgg+ rounds from `initial` (named adapter tensors); the final adapter.

    `evaluate_fn(round, arrays)` is the server's held-out evaluation, called before round 1 and after
    each round (on the previous adapter after a round that could not be rebuilt)."""
    names = list(initial.keys())
    workflow = secagg_workflow(job.secure_aggregation, job.round_timeout_s)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=job.num_rounds, round_timeout=job.round_timeout_s),
        strategy=strategy,
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        compat.arrayrecord_to_parameters(initial, keep_input=True), keep_input=True
    )
    config = ConfigRecord()
    context.state.config_records[MAIN_CONFIGS_RECORD] = config
    evaluate_fn(0, initial)
    for server_round in range(1, job.num_rounds + 1):
        config[WorkflowKey.CURRENT_ROUND] = server_round
        workflow(grid, context)
        if server_round not in strategy.aggregated_rounds:
            logger.warning("round %d: SecAgg+ could not rebuild the sum; the adapter is unchanged", server_round)
            strategy.record_failed_round(server_round)
        evaluate_fn(server_round, named_arrays(names, context.state.array_records[MAIN_PARAMS_RECORD]))
    return named_arrays(names, context.state.array_records[MAIN_PARAMS_RECORD])
