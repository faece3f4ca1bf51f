"""The payments unit suite (ledger, settlement, reconcile, crash at every settlement step) on PostgreSQL.

The same test modules, not a copy: tests/unit/payments/conftest.py takes its database from
`ledger_database_url`, which gives each test a fresh database on the cluster named by
`SOLANALM_TEST_POSTGRES`. They run in a child pytest because they fork per test (forked.py), which
must not happen in a process that has started Ray.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import ENV_VAR, PostgresCluster

# SQLite-only by design (pre-Alembic SQLite files, the SQLite migration/CLI checks) or no ledger at all.
NOT_ON_POSTGRES = (
    "test_ledger_upgrade.py",
    "test_migrations.py",
    "test_pricing.py",
    "test_litesvm_backend.py",
    "test_group_commit.py",
)
MIN_TESTS = 80  # the suite has ~90 ledger-backed tests; fewer means modules were lost, not passed


@pytest.mark.slow
def test_the_payments_unit_suite_passes_on_postgres(postgres_cluster: PostgresCluster, repo_root: Path) -> None:
    suite = repo_root / "tests" / "unit" / "payments"
    argv = [sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "-rf"]  # not -q: the header
    argv += [f"--ignore={suite / name}" for name in NOT_ON_POSTGRES]
    env = {**os.environ, ENV_VAR: postgres_cluster.to_env()}
    done = subprocess.run(argv, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert f"payments ledger: PostgreSQL at {postgres_cluster.socket_dir}" in output, output[:2000]
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) >= MIN_TESTS, output[-2000:]
    assert " failed" not in output and " skipped" not in output, output[-2000:]
