"""Structured logs: one JSON object per line, with the request id of the request being served.

`configure_logging(section)` is called once by every SolanaLM entry point (the CLI, the gateway and
pipeline replicas, the payments actor). With `format: json` it installs one stderr handler on the root
logger that writes JSON (Ray copies a worker's stderr into its log files, so replica logs are JSON
too); with `format: text` it only sets the level of SolanaLM's own loggers. The gateway sets
`REQUEST_ID` per request; every record logged while it is set carries `request_id`.

`LogTail` reads them back (the TUI's log view): it follows the log files of a directory, keeps its
offsets, and parses only the lines this formatter wrote.
"""

import json
import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
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


# Reading the JSON logs back (`solanalm tui`'s log view): Ray writes each worker's stderr, where the handler
# above writes, into `<session dir>/logs/` (worker-*.err and Serve's replica logs); a tail follows them there.
LOG_SUFFIXES = (".err", ".out", ".log")
_FIRST_READ_BYTES = 64 * 1024  # a file first seen is read from its last 64 KiB, not from its start


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One JSON log line as `JsonFormatter` wrote it; `source` is the file it came from."""

    ts: str
    level: str
    logger: str
    message: str
    request_id: str | None = None
    pid: int | None = None
    source: str = ""

    def matches(self, request_id: str) -> bool:
        """True when no filter is typed, or this entry's request id contains it."""
        wanted = request_id.strip()
        return not wanted or (self.request_id is not None and wanted in self.request_id)


def parse_log_line(line: str, source: str = "") -> LogEntry | None:
    """The entry of one line written by `JsonFormatter`; None for any other line (Ray's, plain text)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(raw, dict) or not {"ts", "level", "logger", "message"} <= raw.keys():
        return None
    request_id, pid = raw.get("request_id"), raw.get("pid")
    return LogEntry(
        str(raw["ts"]),
        str(raw["level"]),
        str(raw["logger"]),
        str(raw["message"]),
        str(request_id) if request_id else None,
        pid if isinstance(pid, int) else None,
        source,
    )


@dataclass
class LogTail:
    """Follows every log file under `directory` (new files included): each `read_new()` returns the JSON
    entries appended since the last call, oldest first. A truncated or replaced file is read again."""

    directory: Path
    offsets: dict[Path, int] = field(default_factory=dict)
    partial: dict[Path, str] = field(default_factory=dict)  # a line still being written

    def read_new(self) -> list[LogEntry]:
        entries = []
        for path in self._files():
            for line in self._new_lines(path):
                entry = parse_log_line(line, path.name)
                if entry is not None:
                    entries.append(entry)
        return sorted(entries, key=lambda e: e.ts)  # ISO-8601 UTC stamps sort as text; the sort is stable

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.rglob("*") if p.suffix in LOG_SUFFIXES and p.is_file())

    def _new_lines(self, path: Path) -> list[str]:
        size = path.stat().st_size
        start = self.offsets.get(path)
        mid_line = False
        if start is None:
            start = max(0, size - _FIRST_READ_BYTES)
            mid_line = start > 0  # the first line read is the end of one cut off
        elif size < start:  # truncated or rotated: start again
            start, self.partial[path] = 0, ""
        if size == start:
            return []
        with path.open("rb") as handle:
            handle.seek(start)
            chunk = handle.read(size - start).decode("utf-8", errors="replace")
        self.offsets[path] = size
        text = self.partial.pop(path, "") + chunk
        lines = text.split("\n")
        if not text.endswith("\n"):
            self.partial[path] = lines.pop()
        return lines[1:] if mid_line else lines
