"""Rewards: proportional to examples, zero for dropped clients; the JSONL sink; sink selection."""

import json
from pathlib import Path

from cluster.config.training import TrainingSection
from train_jobs.protocol import (
    JsonlRewardSink,
    RewardSink,
    assigned_examples,
    credited_examples,
    make_reward_sink,
    round_rewards,
    within_budget,
)


def test_round_rewards_pay_examples_and_zero_dropped() -> None:
    rewards = round_rewards("job", 2, ["A", "B", "C"], {"A": 10, "C": 4}, lamports_per_example=100)
    by_wallet = {r.wallet: r for r in rewards}
    assert by_wallet["A"].amount_lamports == 1000 and not by_wallet["A"].dropped
    assert by_wallet["B"].amount_lamports == 0 and by_wallet["B"].examples == 0 and by_wallet["B"].dropped
    assert by_wallet["C"].amount_lamports == 400
    assert {r.round for r in rewards} == {2}


def test_a_round_is_scaled_down_to_its_budget() -> None:
    rewards = round_rewards(
        "job", 1, ["A", "B", "C"], {"A": 10, "B": 20}, lamports_per_example=100, budget_lamports=1000
    )
    by_wallet = {r.wallet: r.amount_lamports for r in rewards}
    assert by_wallet == {"A": 333, "B": 666, "C": 0} and sum(by_wallet.values()) <= 1000
    under = round_rewards("job", 1, ["A"], {"A": 3}, lamports_per_example=100, budget_lamports=1000)
    assert under[0].amount_lamports == 300  # within the budget: paid in full
    assert sum(within_budget({"x": 7, "y": 7, "z": 7}, 10).values()) <= 10
    assert within_budget({"x": 5}, 0) == {"x": 0}


def test_the_credited_count_is_at_most_what_the_server_assigned() -> None:
    assert credited_examples(reported=120, assigned=12) == 12
    assert credited_examples(reported=9, assigned=12) == 9
    assert credited_examples(reported=-5, assigned=12) == 0
    assert assigned_examples(partition_size=72, max_steps=6, batch_size=8) == 48
    assert assigned_examples(partition_size=10, max_steps=6, batch_size=8) == 10


def test_jsonl_sink_appends(tmp_path: Path) -> None:
    sink = JsonlRewardSink(tmp_path / "r" / "rewards.jsonl")
    assert isinstance(sink, RewardSink)
    sink.record(round_rewards("job", 1, ["A"], {"A": 3}, 2))
    sink.record(round_rewards("job", 2, ["A"], {}, 2))
    lines = [json.loads(line) for line in (tmp_path / "r" / "rewards.jsonl").read_text().splitlines()]
    assert [(r["round"], r["amount_lamports"], r["dropped"]) for r in lines] == [
        (1, 6, False),
        (2, 0, True),
    ]


def test_auto_sink_without_ray_is_jsonl(tmp_path: Path) -> None:
    sink = make_reward_sink(TrainingSection(reward_sink="auto"), "ns", jsonl_path=tmp_path / "x.jsonl")
    assert isinstance(sink, JsonlRewardSink) and sink.path == tmp_path / "x.jsonl"
