"""A throwaway PostgreSQL cluster for tests: initdb in a temp dir, one fresh database per test.

`PostgresCluster.start()` runs Debian's (or any) PostgreSQL binaries: `initdb` with trust auth, then
`pg_ctl start` on a free localhost port with its unix socket in the same temp dir, durability off (a test
cluster survives no power cut; process crashes are what the ledger tests inject). PostgreSQL refuses to
run as root, so as root (CI, this machine) the cluster is owned by and run as the `nobody` user.

`postgres_cluster` (session) and `postgres_url` (a fresh database per test, dropped afterwards) are the
pytest fixtures; `tests/integration/conftest.py` exposes them. A test process started by another (the
unit payments suite re-run on PostgreSQL) reaches the same cluster through `SOLANALM_TEST_POSTGRES`.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ENV_VAR = "SOLANALM_TEST_POSTGRES"  # JSON of a running `PostgresCluster` (see `to_env`)
UNPRIVILEGED_USER = "nobody"  # who owns and runs the cluster when the tests run as root
START_TIMEOUT_S = 60
SEARCH_DIRS = ("/usr/lib/postgresql", "/usr/local/pgsql", "/opt/homebrew/opt")  # versioned bin dirs


def find_bindir() -> Path | None:
    """The directory holding initdb/pg_ctl/pg_dump: PATH first, else the newest of Debian's versioned dirs."""
    on_path = shutil.which("initdb")
    if on_path and Path(on_path).resolve().with_name("pg_ctl").exists():
        return Path(on_path).resolve().parent
    candidates: list[Path] = []
    for root in SEARCH_DIRS:
        candidates += [p.parent for p in Path(root).glob("*/bin/initdb")]
        candidates += [p.parent for p in Path(root).glob("bin/initdb")]
    candidates = [c for c in candidates if (c / "pg_ctl").exists()]

    def version(path: Path) -> float:
        try:
            return float(path.parent.name)
        except ValueError:
            return 0.0

    return max(candidates, key=version) if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PostgresCluster:
    """A running throwaway cluster: where its binaries, data and socket are, and how to reach it."""

    bindir: str
    root: str  # temp dir: data/, the socket, the server log
    port: int
    user: str = "postgres"  # the superuser initdb made (trust auth: no password)

    @property
    def socket_dir(self) -> str:
        return self.root

    @property
    def data_dir(self) -> str:
        return os.path.join(self.root, "data")

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy URL of `database` over the unix socket."""
        return f"{driver}://{self.user}@/{database}?host={self.socket_dir}&port={self.port}"

    def libpq_args(self) -> list[str]:
        """-h/-p/-U for psql, pg_dump, pg_restore."""
        return ["-h", self.socket_dir, "-p", str(self.port), "-U", self.user]

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, value: str) -> "PostgresCluster":
        return cls(**json.loads(value))

    # Databases ---------------------------------------------------------------------------------------
    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=self.socket_dir, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database (copied from template1, which is fast); returns its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: ends connections a test leaked

    # Life cycle --------------------------------------------------------------------------------------
    @classmethod
    def start(cls, bindir: Path) -> "PostgresCluster":
        """initdb + pg_ctl start in a new temp dir; retried on a port taken between choice and bind."""
        root = tempfile.mkdtemp(prefix="slm-pg-")  # short: a unix socket path has ~100 characters
        try:
            _own(root)
            _as_owner([str(bindir / "initdb"), "-D", os.path.join(root, "data"), "-U", "postgres",
                       "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"])  # fmt: skip
            for attempt in range(3):
                cluster = cls(str(bindir), root, _free_port())
                try:
                    cluster._pg_ctl_start()
                    return cluster
                except subprocess.CalledProcessError:
                    if attempt == 2:
                        raise
        except BaseException:
            log = Path(root, "server.log")
            detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            if detail:
                raise RuntimeError(f"PostgreSQL did not start; server log:\n{detail}") from None
            raise
        raise AssertionError("unreachable")

    def _pg_ctl_start(self) -> None:
        options = " ".join(
            [
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.socket_dir}",
                "-c listen_addresses=127.0.0.1",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",  # a payments service pools a few per test; forked children add theirs
            ]
        )
        log = os.path.join(self.root, "server.log")
        _as_owner([os.path.join(self.bindir, "pg_ctl"), "-D", self.data_dir, "-l", log, "-w",
                   "-t", str(START_TIMEOUT_S), "-o", options, "start"])  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast: tests keep nothing) and remove the temp dir."""
        try:
            _as_owner([os.path.join(self.bindir, "pg_ctl"), "-D", self.data_dir, "-m", "immediate", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass  # not running (a failed start); the directory goes anyway
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _own(path: str) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user=UNPRIVILEGED_USER, group=_group_of(UNPRIVILEGED_USER))


def _group_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _as_owner(argv: list[str]) -> None:
    """Run a server binary, as the unprivileged user when we are root (initdb/postgres refuse root)."""
    as_user: dict[str, object] = {}
    if os.geteuid() == 0:  # subprocess drops to the user itself: no runuser/setpriv/sudo needed
        as_user = {"user": UNPRIVILEGED_USER, "group": _group_of(UNPRIVILEGED_USER), "extra_groups": []}
    subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/", timeout=120, **as_user)  # type: ignore[call-overload]


def cluster_from_environment() -> PostgresCluster | None:
    """The cluster a parent test process started for this one, if any."""
    value = os.environ.get(ENV_VAR)
    return PostgresCluster.from_env(value) if value else None


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway cluster for the session; skipped only where no PostgreSQL binaries exist."""
    inherited = cluster_from_environment()
    if inherited is not None:
        yield inherited
        return
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb) on PATH or under /usr/lib/postgresql/*/bin")
    cluster = PostgresCluster.start(bindir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database, dropped after the test."""
    name = postgres_cluster.create_database()
    try:
        yield postgres_cluster.url(name)
    finally:
        postgres_cluster.drop_database(name)
