"""Suite-wide fixtures: an isolated model cache and the shared settings catalogue path."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Converted weights cache shared by the whole run (the GGUF conversion is done at most once)."""
    path = Path(os.environ.get("SOLANALM_TEST_CACHE", Path.home() / ".cache" / "solanalm-test"))
    path.mkdir(parents=True, exist_ok=True)
    return path
