"""SQL tables of the payments ledger (SQLAlchemy Core; SQLite by default, PostgreSQL by URL).

Accounting model: every movement of money is one row of `postings` (from_account -> to_account,
amount > 0) and `accounts.balance` caches credits minus debits, so the sum of all balances is zero
by construction and each balance can be recomputed from the postings (see `Ledger.reconcile`).
"""

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("name", String(96), primary_key=True),
    Column("balance", BigInteger, nullable=False, default=0),
)

postings = Table(
    "postings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ref", String(96), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("from_account", String(96), nullable=False),
    Column("to_account", String(96), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)

holds = Table(
    "holds",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("payer", String(64), nullable=False),
    Column("model", String(128), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("max_tokens", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # open | settled | released
    Column("created_at", Float, nullable=False),
)

settlements = Table(
    "settlements",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("request_id", String(128), nullable=False, unique=True),
    Column("payer", String(64), nullable=False, index=True),
    Column("model", String(128), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("price_prompt_per_1k", BigInteger, nullable=False),
    Column("price_completion_per_1k", BigInteger, nullable=False),
    Column("cost", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)

payout_batches = Table(
    "payout_batches",
    metadata,
    Column("id", String(40), primary_key=True),
    # created -> signed -> sent -> confirmed | failed; signed/sent go back to created when expired.
    Column("state", String(16), nullable=False, index=True),
    Column("attempt", Integer, nullable=False, default=0),
    Column("tx_bytes", LargeBinary, nullable=True),
    Column("signature", String(100), nullable=True),
    Column("blockhash", String(64), nullable=True),
    Column("last_valid_block_height", BigInteger, nullable=True),
    Column("fee_lamports", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

settlement_shares = Table(
    "settlement_shares",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("settlement_id", String(40), ForeignKey("settlements.id"), nullable=False, index=True),
    Column("wallet", String(64), nullable=False),
    Column("role", String(16), nullable=False),  # provider | proxy | network
    Column("layers_served", Integer, nullable=False),
    Column("amount", BigInteger, nullable=False),
    # Set when the share is put into a payout batch; NULL = unpaid (network shares stay NULL).
    Column("batch_id", String(40), ForeignKey("payout_batches.id"), nullable=True),
)
Index("ix_shares_unpaid", settlement_shares.c.batch_id, settlement_shares.c.wallet)

payout_items = Table(
    "payout_items",
    metadata,
    Column("batch_id", String(40), ForeignKey("payout_batches.id"), primary_key=True),
    Column("wallet", String(64), primary_key=True),
    Column("amount", BigInteger, nullable=False),
)

batch_attempts = Table(
    "batch_attempts",
    metadata,
    Column("batch_id", String(40), ForeignKey("payout_batches.id"), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("signature", String(100), nullable=False),
    Column("last_valid_block_height", BigInteger, nullable=False),
    Column("outcome", String(16), nullable=True),  # expired | confirmed | failed
)

deposits = Table(
    "deposits",
    metadata,
    Column("signature", String(100), primary_key=True),
    Column("wallet", String(64), nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),
    Column("slot", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)

nonces = Table(
    "siws_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),  # rows past it are purged at each challenge
    Column("used", Integer, nullable=False, default=0),
    # The challenge is bound to its wallet and to the exact text issued (SHA-256 hex): verify needs both equal.
    Column("wallet", String(64), nullable=False),
    Column("message_hash", String(64), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("wallet", String(64), nullable=False, index=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

lookup_tables = Table(
    "lookup_tables",
    metadata,
    # Recorded before the creating transaction is sent, so a crash cannot leak an unknown table.
    Column("address", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
)

payee_quarantine = Table(
    "payee_quarantine",
    metadata,
    # A payee whose transfer failed on chain: its shares stay unpaid (batch_id NULL) and are left out
    # of new batches until retry_at; a successful payout or the operator removes the row.
    Column("wallet", String(64), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("batch_id", String(40), nullable=True),  # the failed batch that named it (None: never sent)
    Column("failures", Integer, nullable=False),
    Column("quarantined_at", Float, nullable=False),
    Column("retry_at", Float, nullable=False),
)

settlement_lease = Table(
    "settlement_lease",
    metadata,
    # One row per lease name: the payments worker that may settle (sign and send payouts) until expires_at.
    # Taken and renewed with a conditional UPDATE (payments.ledger.lease), so two workers never both hold it.
    Column("name", String(32), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("acquired_at", Float, nullable=False),
)
