"""Alembic on a real PostgreSQL server: migration 0001 builds exactly schema.py, and concurrent openers serialise."""

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import create_engine, text

from payments.ledger.migrate import current_revision, head_revision, migrate, schema_drift, upgrade_sql
from payments.ledger.schema import metadata


def test_the_migrated_postgres_ledger_matches_schema_py(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        assert migrate(engine).to_revision == head_revision()
        with engine.connect() as conn:
            assert current_revision(conn) == head_revision()
            assert schema_drift(conn) == []
        assert not migrate(engine).changed
    finally:
        engine.dispose()


def test_gateways_opening_a_new_ledger_at_once_migrate_it_once(postgres_url: str) -> None:
    engines = [create_engine(postgres_url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            results = list(pool.map(migrate, engines))  # without the advisory lock, CREATE TABLE races
        assert sum(r.from_revision is None for r in results) == 1  # one ran 0001, the rest found it done
        assert {r.to_revision for r in results} == {head_revision()}
    finally:
        for engine in engines:
            engine.dispose()


def test_a_pre_alembic_postgres_ledger_is_adopted(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO accounts VALUES ('client:w', 7)"))
        assert migrate(engine).adopted
        with engine.connect() as conn:
            assert schema_drift(conn) == []
            assert conn.execute(text("SELECT balance FROM accounts")).scalar() == 7
    finally:
        engine.dispose()


def test_offline_sql_is_postgres_ddl(postgres_url: str) -> None:
    sql = upgrade_sql(postgres_url)
    assert "CREATE TABLE postings" in sql and "SERIAL" in sql and "BEGIN;" in sql
