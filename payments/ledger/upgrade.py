"""Bring a ledger written by an earlier release up to the current columns, in place, at open.

`metadata.create_all` creates missing tables but never alters existing ones, so a ledger from before
the sign-in and API-key hardening (issue 18) lacked columns the code now reads. This adds them, with
values that keep old rows safe: outstanding sign-in nonces are dropped (they live minutes; a client asks
for a new challenge), and API keys issued before expiry existed expire `LEGACY_KEY_TTL_S` after they were
made. Additive only, on SQLite and PostgreSQL alike. Since Alembic (`payments.ledger.migrate`) it runs
only on ledgers without an `alembic_version`, bringing them to the shape of migration 0001 before the stamp;
schema changes from then on are Alembic revisions under `migrations/versions/`.
"""

import logging

from sqlalchemy import Connection, Engine, inspect, text

logger = logging.getLogger(__name__)

LEGACY_KEY_TTL_S = 30 * 86_400  # the default `payments.api_key_ttl_s`


def upgrade_schema(bind: Engine | Connection) -> list[str]:
    """Add the columns an older ledger lacks; returns what was added (`table.column`)."""
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            return upgrade_schema(conn)
    conn = bind
    present = {
        table: {c["name"] for c in inspect(conn).get_columns(table)} for table in inspect(conn).get_table_names()
    }
    added: list[str] = []
    nonces = present.get("siws_nonces", set())
    if nonces and not {"wallet", "message_hash"} <= nonces:
        conn.execute(text("DELETE FROM siws_nonces"))  # unbound challenges: never verifiable again
        for column in ("wallet", "message_hash"):
            if column not in nonces:
                conn.execute(text(f"ALTER TABLE siws_nonces ADD COLUMN {column} VARCHAR(64) NOT NULL DEFAULT ''"))
                added.append(f"siws_nonces.{column}")
    keys = present.get("api_keys", set())
    if keys and "expires_at" not in keys:
        conn.execute(text("ALTER TABLE api_keys ADD COLUMN expires_at FLOAT NOT NULL DEFAULT 0"))
        conn.execute(text("UPDATE api_keys SET expires_at = created_at + :ttl"), {"ttl": LEGACY_KEY_TTL_S})
        added.append("api_keys.expires_at")
    if added:
        logger.warning("ledger upgraded in place: added %s", ", ".join(added))
    return added
