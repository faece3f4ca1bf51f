"""Migration scripts, oldest first (0001 is the schema as it stood when Alembic came in)."""
