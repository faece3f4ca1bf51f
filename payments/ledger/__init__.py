"""The payments ledger: double-entry accounting over SQL (SQLAlchemy Core)."""
