"""Backups of the ledger: SQLite through its online backup API, PostgreSQL through pg_dump / pg_restore.

SQLite: `sqlite3.Connection.backup` copies the database page by page under SQLite's own locking, so a
backup taken while the payments actor writes is a consistent snapshot (a write during the copy restarts
it; WAL readers never block the writer). PostgreSQL: `pg_dump -Fc` is one repeatable-read snapshot;
`pg_restore --clean --if-exists` replaces the ledger's objects with the dump's. The PostgreSQL client
tools are looked up on PATH, then in Debian's /usr/lib/postgresql/<version>/bin.

A restored ledger is as old as its backup: run `solanalm payments reconcile` after it, which first finds
payouts the chain made since (`payments.catchup`), so nothing is paid twice.
"""

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from payments.errors import InvalidRequest

PG_TOOL_DIRS = ("/usr/lib/postgresql",)
PG_TOOL_TIMEOUT_S = 3_600


@dataclass(frozen=True, slots=True)
class BackupResult:
    """What a backup or restore did, for the CLI to print."""

    action: str  # backup | restore
    database: str  # the URL without its password
    path: Path
    size_bytes: int
    method: str  # sqlite3 online backup | pg_dump -Fc | pg_restore --clean


def backup(url: str, path: Path, force: bool = False) -> BackupResult:
    """Write a backup of the ledger at `url` to `path` (refused if `path` exists, unless `force`)."""
    if path.exists() and not force:
        raise InvalidRequest(f"{path} exists; pass --force to overwrite it", code="backup_exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        source = _sqlite_file(url)
        partial = path.with_name(path.name + ".partial")  # a crash mid-copy never leaves a half file at `path`
        _sqlite_copy(source, partial)
        os.replace(partial, path)
        method = "sqlite3 online backup"
    elif parsed.get_backend_name() == "postgresql":
        _run([_pg_tool("pg_dump"), "-Fc", "--no-owner", "-f", str(path), "--dbname", _libpq(url)])
        method = "pg_dump -Fc"
    else:
        raise InvalidRequest(f"no backup for {parsed.get_backend_name()} ledgers", code="unsupported_database")
    return BackupResult("backup", _safe(url), path, path.stat().st_size, method)


def restore(url: str, path: Path, force: bool = False) -> BackupResult:
    """Replace the ledger at `url` with the backup at `path` (refused over a non-empty ledger, unless `force`)."""
    if not path.is_file():
        raise InvalidRequest(f"no backup at {path}", code="backup_missing")
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        target = _sqlite_file(url)
        if target.exists() and target.stat().st_size > 0 and not force:
            raise InvalidRequest(f"ledger {target} exists; pass --force to replace it", code="ledger_exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_copy(path, target)  # into the live file (its WAL too), not a rename under open connections
        method = "sqlite3 online backup"
    elif parsed.get_backend_name() == "postgresql":
        if not force and _pg_has_tables(url):
            raise InvalidRequest("the PostgreSQL ledger has tables; pass --force to replace them", code="ledger_exists")
        argv = [_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction"]
        _run([*argv, "--dbname", _libpq(url), str(path)])
        method = "pg_restore --clean"
    else:
        raise InvalidRequest(f"no restore for {parsed.get_backend_name()} ledgers", code="unsupported_database")
    return BackupResult("restore", _safe(url), path, path.stat().st_size, method)


def _sqlite_file(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise InvalidRequest("an in-memory SQLite ledger has nothing to back up", code="unsupported_database")
    return Path(database)


def _sqlite_copy(source: Path, target: Path) -> None:
    if not source.is_file():
        raise InvalidRequest(f"no SQLite database at {source}", code="backup_missing")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target, timeout=30)
    try:
        src.backup(dst, pages=1024)  # in steps: the writer is not held off for the whole copy
    finally:
        dst.close()
        src.close()


def _pg_has_tables(url: str) -> bool:
    from sqlalchemy import create_engine, inspect

    engine = create_engine(url)
    try:
        return bool(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    flat = sorted(
        (p for root in PG_TOOL_DIRS for p in Path(root).glob(f"*/bin/{name}")),
        key=lambda p: _version(p.parent.parent.name),
    )
    if not flat:
        raise InvalidRequest(f"{name} not found (install the PostgreSQL client tools)", code="pg_tools_missing")
    return str(flat[-1])


def _version(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def _libpq(url: str) -> str:
    """The SQLAlchemy URL as a libpq connection URI (no `+driver`), which pg_dump/pg_restore accept."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=PG_TOOL_TIMEOUT_S)
    if done.returncode != 0:
        raise InvalidRequest(f"{Path(argv[0]).name} failed: {done.stderr.strip()[-2000:]}", code="backup_failed")
