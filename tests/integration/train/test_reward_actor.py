"""The reward seam against a live named actor (a stand-in with the payments actor's method name)."""

import pytest
import ray

from cluster.config.training import TrainingSection
from train_jobs.protocol import RayActorRewardSink, RewardSinkError, make_reward_sink, round_rewards

pytestmark = pytest.mark.usefixtures("ray_cluster")


@ray.remote(num_cpus=0)
class _FakePayments:
    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def record_training_rewards(self, rewards: list[dict[str, object]]) -> int:
        self.records.extend(rewards)
        return len(rewards)

    def all(self) -> list[dict[str, object]]:
        return self.records

    def reject(self, rewards: list[dict[str, object]]) -> None:
        raise ValueError("unknown wallet")


def test_auto_sink_calls_the_named_actor_by_method() -> None:
    training = TrainingSection(rewards_actor_name="fake-payments-train-test")
    actor = _FakePayments.options(name=training.rewards_actor_name).remote()  # type: ignore[attr-defined]
    try:
        sink = make_reward_sink(training, namespace="solanalm-test")
        assert isinstance(sink, RayActorRewardSink)
        sink.record(round_rewards("job", 1, ["A", "B"], {"A": 7}, lamports_per_example=10))
        records = ray.get(actor.all.remote(), timeout=30)
        assert [(r["wallet"], r["amount_lamports"], r["dropped"]) for r in records] == [
            ("A", 70, False),
            ("B", 0, True),
        ]
    finally:
        ray.kill(actor)


def test_missing_actor_is_a_sink_error() -> None:
    sink = RayActorRewardSink("no-such-actor", "record_training_rewards", "solanalm-test", 5.0)
    with pytest.raises(RewardSinkError):
        sink.record(round_rewards("job", 1, ["A"], {"A": 1}, 1))


def test_error_inside_the_actor_is_a_sink_error() -> None:
    actor = _FakePayments.options(name="fake-payments-reject").remote()  # type: ignore[attr-defined]
    try:
        sink = RayActorRewardSink("fake-payments-reject", "reject", "solanalm-test", 30.0)
        with pytest.raises(RewardSinkError):
            sink.record(round_rewards("job", 1, ["A"], {"A": 1}, 1))
    finally:
        ray.kill(actor)
