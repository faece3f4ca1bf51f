"""The ledger schema when Alembic came in (payments/ledger/schema.py as of issue 26).

A ledger created before Alembic is brought to this shape by `payments.ledger.upgrade` and stamped 0001
instead of running this (see `payments.ledger.migrate`).

Revision ID: 0001
Revises:
Create Date: 2026-12-03 17:14:07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create every table of the ledger."""
    op.create_table(
        "accounts",
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("wallet", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_index(op.f("ix_api_keys_wallet"), "api_keys", ["wallet"], unique=False)
    op.create_table(
        "deposits",
        sa.Column("signature", sa.String(length=100), nullable=False),
        sa.Column("wallet", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("slot", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("signature"),
    )
    op.create_index(op.f("ix_deposits_wallet"), "deposits", ["wallet"], unique=False)
    op.create_table(
        "holds",
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("payer", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_table(
        "lookup_tables",
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("address"),
    )
    op.create_table(
        "payee_quarantine",
        sa.Column("wallet", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("quarantined_at", sa.Float(), nullable=False),
        sa.Column("retry_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("wallet"),
    )
    op.create_table(
        "payout_batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("tx_bytes", sa.LargeBinary(), nullable=True),
        sa.Column("signature", sa.String(length=100), nullable=True),
        sa.Column("blockhash", sa.String(length=64), nullable=True),
        sa.Column("last_valid_block_height", sa.BigInteger(), nullable=True),
        sa.Column("fee_lamports", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_payout_batches_state"), "payout_batches", ["state"], unique=False)
    op.create_table(
        "postings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ref", sa.String(length=96), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("from_account", sa.String(length=96), nullable=False),
        sa.Column("to_account", sa.String(length=96), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_postings_ref"), "postings", ["ref"], unique=False)
    op.create_table(
        "settlements",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("payer", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("price_prompt_per_1k", sa.BigInteger(), nullable=False),
        sa.Column("price_completion_per_1k", sa.BigInteger(), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index(op.f("ix_settlements_payer"), "settlements", ["payer"], unique=False)
    op.create_table(
        "siws_nonces",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.Column("wallet", sa.String(length=64), nullable=False),
        sa.Column("message_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    op.create_index(op.f("ix_siws_nonces_expires_at"), "siws_nonces", ["expires_at"], unique=False)
    op.create_table(
        "batch_attempts",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("signature", sa.String(length=100), nullable=False),
        sa.Column("last_valid_block_height", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["payout_batches.id"],
        ),
        sa.PrimaryKeyConstraint("batch_id", "attempt"),
    )
    op.create_table(
        "payout_items",
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("wallet", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["payout_batches.id"],
        ),
        sa.PrimaryKeyConstraint("batch_id", "wallet"),
    )
    op.create_table(
        "settlement_shares",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("settlement_id", sa.String(length=40), nullable=False),
        sa.Column("wallet", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("layers_served", sa.Integer(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["payout_batches.id"],
        ),
        sa.ForeignKeyConstraint(
            ["settlement_id"],
            ["settlements.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_settlement_shares_settlement_id"), "settlement_shares", ["settlement_id"], unique=False)
    op.create_index("ix_shares_unpaid", "settlement_shares", ["batch_id", "wallet"], unique=False)


def downgrade() -> None:
    """Drop every table of the ledger (its data with it)."""
    op.drop_index("ix_shares_unpaid", table_name="settlement_shares")
    op.drop_index(op.f("ix_settlement_shares_settlement_id"), table_name="settlement_shares")
    op.drop_table("settlement_shares")
    op.drop_table("payout_items")
    op.drop_table("batch_attempts")
    op.drop_index(op.f("ix_siws_nonces_expires_at"), table_name="siws_nonces")
    op.drop_table("siws_nonces")
    op.drop_index(op.f("ix_settlements_payer"), table_name="settlements")
    op.drop_table("settlements")
    op.drop_index(op.f("ix_postings_ref"), table_name="postings")
    op.drop_table("postings")
    op.drop_index(op.f("ix_payout_batches_state"), table_name="payout_batches")
    op.drop_table("payout_batches")
    op.drop_table("payee_quarantine")
    op.drop_table("lookup_tables")
    op.drop_table("holds")
    op.drop_index(op.f("ix_deposits_wallet"), table_name="deposits")
    op.drop_table("deposits")
    op.drop_index(op.f("ix_api_keys_wallet"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("accounts")
