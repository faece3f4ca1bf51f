"""The one seam between training and payments: typed reward records and where they are sent.

train_jobs never imports payments. After each federated round the coordinator hands a list of
`RoundReward` to a `RewardSink`: either the named payments actor (called by method name, with
plain dicts, so the payments package needs nothing from here) or a JSONL file when payments is
not running.
"""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from cluster.config.training import TrainingSection

logger = logging.getLogger(__name__)


class RoundReward(BaseModel):
    """What one client wallet earned in one round (zero when it was selected but dropped out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(description="Training run name.")
    round: int = Field(ge=1, description="Federated round (1-based).")
    wallet: str = Field(min_length=1, description="Client's Solana wallet (base58 pubkey).")
    examples: int = Field(ge=0, description="Examples trained on in this round.")
    amount_lamports: int = Field(ge=0, description="Reward for this round, in lamports.")
    dropped: bool = Field(default=False, description="Selected but returned no update.")


class RewardSinkError(RuntimeError):
    """A reward record could not be delivered."""


@runtime_checkable
class RewardSink(Protocol):
    """Records the rewards of one round."""

    def record(self, rewards: Sequence[RoundReward]) -> None: ...


def credited_examples(reported: int, assigned: int) -> int:
    """Examples a client is paid for: what it reported, but never more than the server assigned it."""
    return max(0, min(int(reported), int(assigned)))


def assigned_examples(partition_size: int, max_steps: int, batch_size: int) -> int:
    """The server's own count of what one round asks of a client: its partition once at most, and no
    more than `max_steps` batches of `batch_size` (a client cannot earn by cycling over its data)."""
    return max(0, min(partition_size, max_steps * batch_size))


def within_budget(amounts: Mapping[str, int], budget: int | None) -> dict[str, int]:
    """`amounts` scaled down pro rata (rounded down) when their sum exceeds `budget`: sum <= budget."""
    total = sum(amounts.values())
    if budget is None or total <= budget:
        return dict(amounts)
    return {key: amount * budget // total for key, amount in amounts.items()}


def round_rewards(
    job: str,
    server_round: int,
    selected: Sequence[str],
    examples_by_wallet: Mapping[str, int],
    lamports_per_example: int,
    budget_lamports: int | None = None,
) -> list[RoundReward]:
    """Rewards proportional to (credited) examples, the round scaled to at most `budget_lamports`;
    selected wallets without an update get zero."""
    wanted = {wallet: int(examples_by_wallet.get(wallet, 0)) * lamports_per_example for wallet in selected}
    amounts = within_budget(wanted, budget_lamports)
    rewards = []
    for wallet in dict.fromkeys(selected):
        rewards.append(
            RoundReward(
                job=job,
                round=server_round,
                wallet=wallet,
                examples=int(examples_by_wallet.get(wallet, 0)),
                amount_lamports=amounts[wallet],
                dropped=wallet not in examples_by_wallet,
            )
        )
    return rewards


class JsonlRewardSink:
    """Appends one JSON line per reward (used when the payments actor is not running)."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()

    def record(self, rewards: Sequence[RoundReward]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            for reward in rewards:
                handle.write(reward.model_dump_json() + "\n")


class RayActorRewardSink:
    """Calls `actor.<method>.remote([reward dicts])` on a named Ray actor; waits with a timeout."""

    def __init__(self, actor_name: str, method: str, namespace: str | None, timeout_s: float) -> None:
        self.actor_name = actor_name
        self.method = method
        self.namespace = namespace
        self.timeout_s = timeout_s

    def record(self, rewards: Sequence[RoundReward]) -> None:
        import ray
        from ray.exceptions import RayError  # actor gone, timeout, or an error raised in the method

        payload = [reward.model_dump(mode="json") for reward in rewards]
        try:
            actor = ray.get_actor(self.actor_name, namespace=self.namespace)
            ray.get(getattr(actor, self.method).remote(payload), timeout=self.timeout_s)
        except (ValueError, AttributeError, RayError) as exc:
            raise RewardSinkError(f"could not record rewards with {self.actor_name}.{self.method}") from exc


def actor_is_running(actor_name: str, namespace: str | None) -> bool:
    """True if the named actor exists in the connected Ray cluster."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        ray.get_actor(actor_name, namespace=namespace)
    except ValueError:
        return False
    return True


def make_reward_sink(training: TrainingSection, namespace: str | None, jsonl_path: Path | None = None) -> RewardSink:
    """The sink the settings ask for; `auto` uses the payments actor when it is running."""
    use_actor = training.reward_sink == "actor" or (
        training.reward_sink == "auto" and actor_is_running(training.rewards_actor_name, namespace)
    )
    if use_actor:
        return RayActorRewardSink(
            training.rewards_actor_name,
            training.rewards_actor_method,
            namespace,
            training.rewards_call_timeout_s,
        )
    path = jsonl_path or training.rewards_jsonl_path
    logger.info("payments actor not used; rewards go to %s", path)
    return JsonlRewardSink(path)
