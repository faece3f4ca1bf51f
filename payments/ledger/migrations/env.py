"""Alembic environment of the ledger: online on the caller's connection (or the configured URL), offline as SQL.

`payments.ledger.migrate` passes an open connection in `config.attributes["connection"]`, so migrating
runs in the ledger's own transaction; `solanalm payments migrate --sql` runs offline from the URL alone.
Batch mode on SQLite, whose ALTER TABLE cannot change or drop columns: Alembic copies the table instead.
"""

from alembic import context
from sqlalchemy import Connection, create_engine

from payments.ledger.schema import metadata

config = context.config


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else (url or "").split(":", 1)[0]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=metadata,
        render_as_batch=dialect.startswith("sqlite"),
        literal_binds=connection is None,
        compare_type=True,
    )


def run_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(str(config.get_main_option("sqlalchemy.url")))
    try:
        with engine.connect() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
