"""The ledger's schema through Alembic: a new ledger runs migration 0001, an old one is adopted and stamped,
and the migrated database matches schema.py exactly (Alembic's autogenerate finds nothing to do)."""

from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from payments.cli import app
from payments.ledger.ledger import Ledger, SplitPolicy
from payments.ledger.migrate import BASELINE_REVISION, current_revision, head_revision, migrate, schema_drift
from payments.ledger.schema import metadata
from payments.pricing import Price
from tests.unit.payments.test_ledger_upgrade import OLD_TABLES


def test_a_new_ledger_is_created_by_the_migrations_and_matches_schema_py(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'new.sqlite3'}")
    result = migrate(engine)
    assert (result.from_revision, result.to_revision, result.adopted) == (None, head_revision(), False)
    assert set(metadata.tables) <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert schema_drift(conn) == []
    assert not migrate(engine).changed  # a second open does nothing


def test_a_ledger_of_the_release_before_alembic_is_stamped_without_drift(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'prev.sqlite3'}")
    metadata.create_all(engine)  # how every ledger was made before Alembic
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts VALUES ('client:w', 42)"))
        conn.execute(text("DROP INDEX ix_postings_ref"))  # an index the adoption must put back
    result = migrate(engine)
    assert result.adopted and result.added_columns == ()
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert schema_drift(conn) == []
        assert conn.execute(text("SELECT balance FROM accounts")).scalar() == 42  # data kept


def test_a_ledger_from_before_issue_18_is_upgraded_in_place_and_stamped(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    with engine.begin() as conn:
        for ddl in OLD_TABLES:
            conn.execute(text(ddl))
    Ledger(engine, lambda _model: Price(0, 0), SplitPolicy(500, 100))
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        # Only SQLite's reflection of the hand-written old DDL differs (a non-integer PRIMARY KEY reflects
        # as nullable; an inline UNIQUE is not reported): no table, column or index is missing.
        drift = {d[0] if isinstance(d, tuple) else d[0][0] for d in schema_drift(conn)}
        assert drift <= {"modify_nullable", "add_constraint"}, drift


def test_the_adoption_reports_what_it_added(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    with engine.begin() as conn:
        for ddl in OLD_TABLES:
            conn.execute(text(ddl))
    result = migrate(engine)
    assert result.adopted and result.from_revision is None
    assert set(result.added_columns) == {"siws_nonces.wallet", "siws_nonces.message_hash", "api_keys.expires_at"}


def test_cli_migrate_upgrades_the_configured_ledger_and_prints_the_sql(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SOLANALM_PAYMENTS__STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    first = runner.invoke(app, ["migrate"])
    assert first.exit_code == 0 and f"empty -> {head_revision()}" in first.output, first.output
    again = runner.invoke(app, ["migrate"])
    assert again.exit_code == 0 and "already at head" in again.output, again.output
    sql = runner.invoke(app, ["migrate", "--sql"])
    assert sql.exit_code == 0 and "CREATE TABLE postings" in sql.output and "alembic_version" in sql.output
    none = runner.invoke(app, ["migrate", "--sql", "--from", head_revision()])
    assert none.exit_code == 0 and "CREATE TABLE" not in none.output
    assert BASELINE_REVISION == "0001"
