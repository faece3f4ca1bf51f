"""Training settings section (owned by the train_jobs package's maintainers).

Job-specific knobs (model, data, optimiser, privacy) live in the job YAML under `configs/train/`;
this section holds what is shared by every training job on a deployment: where runs are written and
how training rewards reach the payments actor.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from cluster.config.base import Section

RewardSinkKind = Literal["auto", "actor", "jsonl"]


class TrainingSection(Section):
    """Ray Train and Flower defaults shared by the training jobs."""

    jobs_dir: Path = Field(default=Path("configs/train"), description="Directory of training job YAML files.")
    output_dir: Path = Field(
        default=Path("~/.cache/solanalm/train"),
        description="Default storage for checkpoints and run summaries when a job sets none.",
        validate_default=True,
    )
    reward_sink: RewardSinkKind = Field(
        default="auto",
        description="Rewards go to the payments actor, a JSONL file, or auto (actor if running).",
    )
    rewards_actor_name: str = Field(
        default="solanalm-payments",
        min_length=1,
        description="Named (detached) Ray actor that records rewards.",
    )
    rewards_actor_method: str = Field(
        default="record_training_rewards",
        min_length=1,
        description="Actor method called with a list of RoundReward dicts.",
    )
    rewards_call_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Timeout of one reward-recording actor call, in seconds.",
    )
    rewards_jsonl_path: Path = Field(
        default=Path("~/.cache/solanalm/train/rewards.jsonl"),
        description="Reward records appended here when the payments actor is not used.",
        validate_default=True,
    )
    reward_lamports_per_example: int = Field(
        default=1_000,
        ge=0,
        le=10**12,
        description="Reward per training example of a completed round, in lamports.",
    )

    @field_validator("output_dir", "rewards_jsonl_path")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()
