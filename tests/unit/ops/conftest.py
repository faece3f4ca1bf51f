"""Shared fixtures of the ops unit tests."""

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture()
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in ("cluster", "serve_apps", "payments", "train_jobs", "bench"):
        logging.getLogger(name).setLevel(logging.NOTSET)
