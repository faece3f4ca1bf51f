"""JSON logs: one object per line with the request id; configuring twice replaces the handler."""

import io
import json
import logging

import pytest

from cluster.config import Settings
from cluster.config.observability import LoggingSection
from cluster.observability.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, configure_logging


def _line(record: logging.LogRecord) -> dict:
    RequestIdFilter().filter(record)
    return json.loads(JsonFormatter().format(record))


def test_a_record_becomes_one_json_object_with_the_request_id_and_extras() -> None:
    token = REQUEST_ID.set("chatcmpl-123")
    try:
        record = logging.LogRecord("serve_apps.x", logging.WARNING, __file__, 1, "slow %s", ("step",), None)
        record.model = "tiny"
        entry = _line(record)
    finally:
        REQUEST_ID.reset(token)
    assert entry["message"] == "slow step" and entry["level"] == "WARNING" and entry["logger"] == "serve_apps.x"
    assert entry["request_id"] == "chatcmpl-123" and entry["model"] == "tiny"
    assert entry["ts"].endswith("+00:00")


def test_no_request_id_outside_a_request_and_exceptions_are_kept() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = logging.LogRecord("payments", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = _line(record)
    assert "request_id" not in entry and "ValueError: bad" in entry["exc"]


def test_configure_json_installs_one_handler_and_text_removes_it(restore_root: None) -> None:
    configure_logging(LoggingSection(format="json", level="DEBUG"))
    configure_logging(LoggingSection(format="json", level="DEBUG"))
    ours = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    assert len(ours) == 1
    stream = io.StringIO()
    ours[0].setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("train_jobs.fl").debug("round %d", 2)
    assert json.loads(stream.getvalue())["message"] == "round 2"
    configure_logging(LoggingSection(format="text", level="WARNING"))
    assert not [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    assert logging.getLogger("serve_apps").level == logging.WARNING


def test_the_section_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOLANALM_LOGGING__FORMAT", "json")
    assert Settings().logging.format == "json"
    monkeypatch.setenv("SOLANALM_LOGGING__FORMAT", "xml")
    with pytest.raises(ValueError):
        Settings()
