"""Schema migrations of the ledger through Alembic: every ledger is opened by `alembic upgrade head`.

Migration 0001 is the schema as it stood when Alembic came in (`schema.py` at that time). A ledger
written before that has tables but no `alembic_version`: it is first brought to the 0001 shape the way
it was before Alembic (`upgrade.upgrade_schema` adds the columns issue 18 added, `create_all` the missing
tables and indexes), then stamped 0001, then upgraded like any other. On PostgreSQL a transaction-scoped
advisory lock serialises gateways and payments workers that open the same ledger at once.
"""

import io
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from payments.ledger.schema import metadata
from payments.ledger.upgrade import upgrade_schema

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BASELINE_REVISION = "0001"  # the schema when Alembic came in; pre-Alembic ledgers are stamped with it
PG_MIGRATION_LOCK = 0x534C4D4C  # pg_advisory_xact_lock key ("SLML"): one migrator at a time


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What opening the ledger did to its schema."""

    from_revision: str | None  # None: an empty database, or a pre-Alembic ledger
    to_revision: str
    adopted: bool  # a pre-Alembic ledger was brought to the baseline and stamped
    added_columns: tuple[str, ...]  # what the pre-Alembic in-place upgrade added

    @property
    def changed(self) -> bool:
        return self.adopted or self.from_revision != self.to_revision


def alembic_config(url: str | None = None, output: io.StringIO | None = None) -> Config:
    """An Alembic config for the ledger's migrations (no alembic.ini: everything is set here)."""
    cfg = Config(output_buffer=output) if output is not None else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations under {MIGRATIONS_DIR}")
    return head


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, revision: str = "head") -> MigrationResult:
    """Bring the ledger at `engine` to `revision` (default the newest), in one transaction where the DB allows."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        before = current_revision(conn)
        adopted = False
        added: tuple[str, ...] = ()
        if before is None and _has_ledger_tables(conn):
            added = tuple(upgrade_schema(conn))
            metadata.create_all(conn)  # tables added since that ledger was made
            _create_missing_indexes(conn)  # create_all skips the indexes of tables that already exist
            _stamp(conn, BASELINE_REVISION)
            adopted = True
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = current_revision(conn) or ""
    result = MigrationResult(before, after, adopted, added)
    if result.changed:
        origin = "a pre-Alembic ledger" if adopted else before or "an empty database"
        extra = f" (added {', '.join(added)})" if added else ""
        log = logger.info if before is None and not adopted else logger.warning  # a new ledger is no news
        log("ledger schema: %s -> %s%s", origin, after, extra)
    return result


def schema_drift(conn: Connection) -> list[object]:
    """Alembic's autogenerate comparison of the database with `schema.py` (empty: they agree)."""
    from alembic.autogenerate import compare_metadata

    return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata))


def upgrade_sql(url: str, revision: str = "head", from_revision: str | None = None) -> str:
    """The SQL `migrate` would run on an empty database (or from `from_revision`), for a DBA to review."""
    output = io.StringIO()
    target = f"{from_revision}:{revision}" if from_revision else revision
    command.upgrade(alembic_config(url, output), target, sql=True)
    return output.getvalue()


def _stamp(conn: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.stamp(cfg, revision)


def _create_missing_indexes(conn: Connection) -> None:
    inspector = inspect(conn)
    for table in metadata.sorted_tables:
        present = {ix["name"] for ix in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in present:
                index.create(conn)


def _has_ledger_tables(conn: Connection) -> bool:
    return bool(set(inspect(conn).get_table_names()) & set(metadata.tables))
