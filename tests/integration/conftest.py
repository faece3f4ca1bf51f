"""The one shared Ray fixture of the integration tests (a local head started once per session)."""

from collections.abc import Iterator

import pytest
import ray

# Logical CPUs: stages of several pipelines share the 2 physical cores; Ray only does accounting.
TEST_RAY_CPUS = 16


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray head for the whole session (namespace `solanalm-test`)."""
    if not ray.is_initialized():
        ray.init(
            # "local": always a fresh head, even when `ray start` left a cluster on this machine.
            address="local",
            num_cpus=TEST_RAY_CPUS,
            namespace="solanalm-test",
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield
    ray.shutdown()


# The throwaway PostgreSQL cluster (tests/postgres.py): `postgres_cluster` per session, `postgres_url` per test.
from tests.postgres import postgres_cluster, postgres_url  # noqa: E402, F401
