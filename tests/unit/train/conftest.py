"""Tiny-model fixtures of the training unit tests (the model is materialised once per session)."""

from pathlib import Path

import pytest

from train_jobs.config import ModelRef


@pytest.fixture(scope="session")
def tiny_ref(model_cache_dir: Path, repo_root: Path) -> ModelRef:
    return ModelRef(name="tiny-llama", catalogue=repo_root / "configs/models.yaml", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def tiny_dir(tiny_ref: ModelRef) -> Path:
    from train_jobs.task import base_model_dir

    return base_model_dir(tiny_ref)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # The tiny model is latency-bound: one thread is ~8x faster than two on a shared 2-core machine.
    import torch

    torch.set_num_threads(1)
