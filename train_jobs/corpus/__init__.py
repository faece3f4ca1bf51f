"""The bundled, self-generated instruction dataset (see generate.py)."""
