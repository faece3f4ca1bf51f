"""Alembic migrations of the payments ledger (env.py, versions/); `payments.ledger.migrate` runs them."""
