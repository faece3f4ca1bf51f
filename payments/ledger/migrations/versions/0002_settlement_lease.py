"""The settlement lease: one settlement runner at a time among several payments workers (issue 26).

A pre-Alembic ledger adopted by `payments.ledger.migrate` already has the table (`create_all` makes every
table of `schema.py` before the 0001 stamp), so it is created only where missing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create settlement_lease (name, holder, expires_at, acquired_at)."""
    offline = op.get_context().as_sql  # `migrate --sql`: no database to look at
    if not offline and "settlement_lease" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "settlement_lease",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    """Drop settlement_lease."""
    op.drop_table("settlement_lease")
