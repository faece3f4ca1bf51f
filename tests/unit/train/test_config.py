"""Job configs: the shipped YAML parses, mistakes are rejected with a message."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.config import load_settings
from train_jobs.config import DataParallelJob, FederatedJob, load_job


def test_shipped_job_configs_parse(repo_root: Path) -> None:
    for path in sorted((repo_root / "configs/train").glob("*.yaml")):
        kind = DataParallelJob if path.name.startswith("dp-") else FederatedJob
        job = load_job(path, kind)
        assert job.name == path.stem


def test_privacy_comes_from_config(repo_root: Path) -> None:
    job = load_job(repo_root / "configs/train/fl-tiny-dp.yaml", FederatedJob)
    assert job.privacy.enabled and job.privacy.noise_multiplier == 0.8 and job.privacy.delta == 1e-5


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(ValidationError, match="extra"):
        DataParallelJob.model_validate({"name": "x", "optim": {"lr": 1e-3}})


@pytest.mark.parametrize(
    "update, message",
    [
        ({"client_keypairs": ["a.json", "b.json"]}, "client_keypairs has 2 entries"),
        ({"reward_budget_per_round_lamports": -1}, "reward_budget_per_round_lamports"),
        ({"wallets": ["a", "b", "c"]}, "extra"),  # unsigned wallet strings are gone: keys are required
        ({"min_train_clients": 5}, "min_train_clients"),
        ({"simulate_drops": {1: [7]}}, "unknown partitions"),
        ({"privacy": {"enabled": True, "delta": 1.5}}, "delta"),
        ({"sharding": "modulo"}, "sharding"),
    ],
)
def test_federated_job_validation(update: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FederatedJob.model_validate({"name": "fl", "num_clients": 3, **update})


def test_fault_rank_must_exist() -> None:
    with pytest.raises(ValidationError, match="fault_injection.rank"):
        DataParallelJob.model_validate({"name": "x", "num_workers": 2, "fault_injection": {"rank": 2, "at_step": 1}})


def test_training_settings_section(tmp_path: Path) -> None:
    settings = load_settings(training={"reward_sink": "jsonl", "reward_lamports_per_example": 5})
    assert settings.training.rewards_actor_name == "solanalm-payments"
    assert settings.training.rewards_jsonl_path.is_absolute()
    with pytest.raises(ValidationError):
        load_settings(training={"reward_sink": "carrier-pigeon"})


def test_ray_address_never_guesses(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.config.serving import RaySection
    from train_jobs.ray_connect import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(RaySection()) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(RaySection()) == "10.0.0.1:6379"
    assert ray_address(RaySection(address="auto")) == "auto"
