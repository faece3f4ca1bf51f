"""Federated parts without a simulation: server-side DP, backend config, privacy, pending rewards."""

import pytest
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from train_jobs.config import FederatedJob
from train_jobs.federated import backend_config
from train_jobs.fl_server import RewardingFedAvg, _wrap_server_dp, privacy_report
from train_jobs.protocol import JsonlRewardSink


def test_server_side_dp_wraps_the_rewarding_strategy(tmp_path: object) -> None:
    from pathlib import Path

    job = FederatedJob(name="fl", server_dp={"enabled": True, "noise_multiplier": 0.2, "clipping_norm": 5.0})
    sink = JsonlRewardSink(Path(str(tmp_path)) / "r.jsonl")
    fedavg = RewardingFedAvg(job, {}, sink, 1, summary=None, sizes=[])  # type: ignore[arg-type]
    wrapped = _wrap_server_dp(job, fedavg, sampled=3)
    assert isinstance(wrapped, DifferentialPrivacyServerSideFixedClipping)
    assert wrapped.strategy is fedavg and wrapped.clipping_norm == 5.0
    plain = FederatedJob(name="fl")
    assert _wrap_server_dp(plain, fedavg, sampled=3) is fedavg


def test_client_resources_and_privacy_come_from_the_job() -> None:
    job = FederatedJob(
        name="fl",
        client_resources={"num_cpus": 2, "num_gpus": 0.5},
        privacy={"enabled": True, "noise_multiplier": 1.3, "max_grad_norm": 0.7, "delta": 1e-6},
    )
    assert backend_config(job)["client_resources"] == {"num_cpus": 2, "num_gpus": 0.5}
    report = privacy_report(job)
    assert report["dp_sgd"] == {
        "enabled": True,
        "noise_multiplier": 1.3,
        "max_grad_norm": 0.7,
        "delta": 1e-6,
        "max_epsilon": None,
    }


def test_reward_sink_failure_keeps_records(tmp_path: object) -> None:
    from pathlib import Path

    from train_jobs.fl_server import FederatedSummary
    from train_jobs.protocol import RewardSinkError, round_rewards

    class _Broken:
        def record(self, rewards: object) -> None:
            raise RewardSinkError("payments down")

    pending = Path(str(tmp_path)) / "pending.jsonl"
    job = FederatedJob(name="fl")
    strategy = RewardingFedAvg(job, {}, _Broken(), 1, FederatedSummary(job="fl"), [], pending)
    strategy.record_rewards(1, round_rewards("fl", 1, ["A"], {"A": 2}, 1))
    assert '"amount_lamports":2' in pending.read_text()


def test_client_cpus_are_raised_until_the_pool_flower_makes_fits_the_free_cpus() -> None:
    """Flower sizes its pool from each node's total CPUs and waits for every actor: with a serving replica
    holding 1 of 16 CPUs, 4 clients of 4 CPUs would be a pool of 4 that never starts (the run hung)."""
    from train_jobs.federated import fitting_cpus

    assert fitting_cpus(4, [(16.0, 16.0)]) == 4  # nothing else runs: as asked
    assert fitting_cpus(4, [(16.0, 15.0)]) == 5  # 3 actors of 5 = 15 free
    assert fitting_cpus(1, [(16.0, 12.0)]) == 6  # 16 of 1 .. 5 of 3 all exceed 12 free; 2 of 6 = 12 fit
    assert fitting_cpus(0.5, [(16.0, 15.0)]) == 3  # a fraction too: 5 actors of 3
    assert fitting_cpus(4, [(16.0, 15.0), (8.0, 8.0)]) == 5  # every node's share of the pool must fit it
    with pytest.raises(RuntimeError, match="no CPU is free"):
        fitting_cpus(4, [(16.0, 0.0)])


def test_a_client_over_its_epsilon_budget_is_not_selected_and_central_dp_is_accounted(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import math
    from pathlib import Path

    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from train_jobs.fl_server import FederatedSummary, Registration

    job = FederatedJob(
        name="fl",
        num_clients=2,
        min_train_clients=1,
        privacy={"enabled": True, "max_epsilon": 5.0},
        server_dp={"enabled": True, "noise_multiplier": 1.0},
    )
    registrations = {n: Registration(n, n - 1, f"W{n}", f"W{n}") for n in (1, 2)}
    sink = JsonlRewardSink(Path(str(tmp_path)) / "r.jsonl")
    strategy = RewardingFedAvg(job, registrations, sink, 1, FederatedSummary(job="fl"), [10, 10])
    strategy._epsilon = {1: (3.0, 1.5), 2: (3.0, 2.5)}  # node 2: 3.0 + 2.5 would pass 5.0
    assert strategy.within_budget(1) and not strategy.within_budget(2) and strategy.within_budget(3)

    class _Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)  # what a ServerApp process has set
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    sent = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), _Grid()))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in sent] == [1] and strategy._over_budget[2] == ["W2"]
    strategy.aggregate_train(2, [])
    stats = strategy.run_summary.rounds[-1]
    assert stats.over_budget == ["W2"] and stats.dropped == ["W1"] and stats.central_epsilon is not None
    assert 0 < stats.central_epsilon < math.inf
