"""Structured logs: one JSON object per line, with the request id of the request being served.

`configure_logging(section)` is called once by every SolanaLM entry point (the CLI, the gateway and
pipeline replicas, the payments actor). With `format: json` it installs one stderr handler on the root
logger that writes JSON (Ray copies a worker's stderr into its log files, so replica logs are JSON
too); with `format: text` it only sets the level of SolanaLM's own loggers. The gateway sets
`REQUEST_ID` per request; every record logged while it is set carries `request_id`.
"""

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from cluster.config.observability import LoggingSection

REQUEST_ID: ContextVar[str | None] = ContextVar("solanalm_request_id", default=None)
PACKAGES = ("cluster", "serve_apps", "payments", "train_jobs", "bench")
_HANDLER_MARK = "_solanalm_handler"
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Copies the current request id (or None) onto every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "request_id"?, "pid", "exc"?, ...extra}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(section: LoggingSection) -> None:
    """Apply the logging settings to this process (idempotent: a second call replaces the first)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(section.level)
    if section.format != "json":
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    setattr(handler, _HANDLER_MARK, True)
    # Other handlers of the root (basicConfig's) would print each record a second time, in text.
    for other in list(root.handlers):
        if isinstance(other, logging.StreamHandler) and getattr(other, "stream", None) in (sys.stderr, sys.stdout):
            root.removeHandler(other)
    root.addHandler(handler)
