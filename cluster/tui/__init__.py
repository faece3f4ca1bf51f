"""`solanalm tui`: snapshots of the network (snapshot.py, source.py) rendered by a Textual app (app.py)."""
