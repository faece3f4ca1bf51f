"""The one settings object of SolanaLM (nested sections, loaded once in an entry point).

Each subsystem receives only its own section: `Settings.serving`, `Settings.payments`, ...
"""

from cluster.config.root import Settings, load_settings

__all__ = ["Settings", "load_settings"]
