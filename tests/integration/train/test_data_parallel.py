"""Ray Train DDP on the shared cluster: loss goes down; a killed worker resumes from checkpoint."""

from pathlib import Path

import pytest

from cluster.config.training import TrainingSection
from train_jobs.config import DataParallelJob, FaultInjection
from train_jobs.data_parallel import run_data_parallel

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _job(tmp_path: Path, cache: Path, repo: Path, **updates: object) -> DataParallelJob:
    base = {
        "name": "dp-test",
        "model": {
            "name": "tiny-llama",
            "catalogue": str(repo / "configs/models.yaml"),
            "cache_dir": str(cache),
        },
        "data": {"max_length": 24, "max_examples": 96},
        "optim": {"learning_rate": 5e-3, "batch_size": 8, "max_steps": 8},
        "num_workers": 2,
        "cpus_per_worker": 1,
        "checkpoint_every_steps": 2,
        "storage_path": str(tmp_path),
    }
    base.update(updates)
    return DataParallelJob.model_validate(base)


def test_two_workers_loss_goes_down(tmp_path: Path, model_cache_dir: Path, repo_root: Path) -> None:
    job = _job(tmp_path, model_cache_dir, repo_root, sharding="hash")
    result = run_data_parallel(job, TrainingSection())
    assert result.metrics["world_size"] == 2
    assert result.metrics["step"] == 8
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    assert result.metrics["samples_per_s"] > 0
    assert result.checkpoint_path is not None and (result.checkpoint_path / "config.json").exists()


def test_killed_worker_resumes_from_checkpoint(tmp_path: Path, model_cache_dir: Path, repo_root: Path) -> None:
    job = _job(
        tmp_path,
        model_cache_dir,
        repo_root,
        name="dp-kill",
        max_failures=1,
        fault_injection=FaultInjection(rank=1, at_step=5),
    )
    result = run_data_parallel(job, TrainingSection())
    assert (tmp_path / "dp-kill" / ".fault_injected").exists()
    assert result.metrics["resumed_from_step"] == 4  # the last checkpoint before the kill at step 5
    assert result.metrics["step"] == 8
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
