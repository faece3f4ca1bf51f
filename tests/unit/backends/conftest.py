"""Unit fixtures for the backends: a catalogue file written per test and settings pointing at it."""

from pathlib import Path

import pytest
import yaml

from cluster.config import Settings


@pytest.fixture()
def write_catalogue(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write `{name: entry}` as a catalogue and return Settings that use it."""

    def write(models: dict[str, dict]) -> Settings:
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump({"default": next(iter(models)), "models": models}))
        return Settings(model={"catalogue": path, "served": list(models), "cache_dir": tmp_path / "cache"})

    return write
