"""The TUI's log view (JSON log files tailed, filtered by request id) and training view, with Textual's pilot."""

import json
import logging
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Static, TabbedContent

from cluster.observability.logs import JsonFormatter, LogTail, parse_log_line
from cluster.tui.app import NetworkMonitor
from cluster.tui.snapshot import (
    Counters,
    JobView,
    Snapshot,
    TrainingSnapshot,
    jobs_from,
    rewards_from,
    rounds_from,
)
from cluster.tui.training import JobsTrainingSource, TailLogSource

SUMMARY = {
    "job": "fl-demo",
    "rounds": [
        {
            "round": 1,
            "completed": ["WalletA", "WalletB"],
            "dropped": [],
            "client_epsilon": {"WalletA": 0.8, "WalletB": 1.25},
            "train_loss": 2.5,
            "eval_loss": 2.75,
            "rewards_lamports": {"WalletA": 4000, "WalletB": 3000},
        },
        {
            "round": 2,
            "completed": ["WalletA"],
            "dropped": ["WalletB"],
            "client_epsilon": {"WalletA": 1.5},
            "train_loss": 2.25,
            "eval_loss": None,
            "rewards_lamports": {"WalletA": 4000},
        },
    ],
}


def json_line(message: str, request_id: str | None = None, name: str = "serve_apps.metrics") -> str:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)
    record.request_id = request_id
    return JsonFormatter().format(record)


class FixedSource:
    def read(self) -> Snapshot:
        return Snapshot((), (), (), Counters(0.0))


class ListLogs:
    def __init__(self, *batches: list) -> None:
        self.batches = list(batches)

    def read_new(self) -> list:
        return self.batches.pop(0) if self.batches else []


class FixedTraining:
    def read(self) -> TrainingSnapshot:
        return TrainingSnapshot(
            (JobView("raysubmit_1", "train_fl", "SUCCEEDED", 42.0, "[ROUND 2/2] ε=1.5"),),
            tuple(rounds_from([{"run": "fl-demo", **SUMMARY}])),
            tuple(rewards_from([SUMMARY])),
        )


def test_only_lines_the_json_formatter_wrote_are_parsed() -> None:
    entry = parse_log_line(json_line("request ok", "chatcmpl-1"), "worker.err")
    assert entry is not None and (entry.message, entry.request_id, entry.source) == (
        "request ok",
        "chatcmpl-1",
        "worker.err",
    )
    assert parse_log_line("(ServeReplica pid=1) INFO plain text") is None
    assert parse_log_line('{"not": "ours"}') is None and parse_log_line("{broken") is None
    assert entry.matches("") and entry.matches("cmpl-1") and not entry.matches("other")


def test_tail_follows_appends_new_files_and_partial_lines(tmp_path: Path) -> None:
    first = tmp_path / "worker-1.err"
    first.write_text("Ray's own line\n" + json_line("one", "r1") + "\n")
    tail = LogTail(tmp_path)
    assert [e.message for e in tail.read_new()] == ["one"]
    assert tail.read_new() == []
    half = json_line("two", "r2")
    with first.open("a") as handle:
        handle.write(half[:10])
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "replica.log").write_text(json_line("three", "r3") + "\n")
    assert [e.message for e in tail.read_new()] == ["three"]
    with first.open("a") as handle:
        handle.write(half[10:] + "\n")
    assert [e.request_id for e in tail.read_new()] == ["r2"]
    first.write_text(json_line("after truncation") + "\n")
    assert [e.message for e in tail.read_new()] == ["after truncation"]


def test_a_long_file_is_read_from_its_end(tmp_path: Path) -> None:
    path = tmp_path / "big.err"
    path.write_text("".join(json_line(f"line {i}", f"r{i}") + "\n" for i in range(2000)))
    entries = LogTail(tmp_path).read_new()
    assert entries[-1].message == "line 1999" and 0 < len(entries) < 2000
    assert all(e.message.startswith("line ") for e in entries)  # the cut-off first line is dropped


def test_rounds_and_rewards_from_summaries() -> None:
    rounds = rounds_from([{"run": "fl-demo", **SUMMARY}])
    assert [(r.round, r.completed, r.dropped, r.epsilon, r.rewards_lamports) for r in rounds] == [
        (1, 2, 0, 1.25, 7000),
        (2, 1, 1, 1.5, 4000),
    ]
    assert rounds[1].eval_loss is None and rounds[0].run == "fl-demo"
    assert [(w.wallet, w.rounds, w.lamports) for w in rewards_from([SUMMARY])] == [
        ("WalletA", 2, 8000),
        ("WalletB", 1, 3000),
    ]
    job = jobs_from([{"job_id": "j", "kind": "train_fl", "status": "RUNNING", "progress": ["a", "b"]}])
    assert job == [JobView("j", "train_fl", "RUNNING", None, "b")]


def test_training_source_reads_summaries_and_says_when_no_job_server(tmp_path: Path) -> None:
    (tmp_path / "fl-demo").mkdir()
    (tmp_path / "fl-demo" / "summary.json").write_text(json.dumps(SUMMARY))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "summary.json").write_text("{")
    snapshot = JobsTrainingSource(tmp_path, address=lambda: None).read()
    assert [r.run for r in snapshot.rounds] == ["fl-demo", "fl-demo"] and snapshot.jobs == ()
    assert any("job server" in note for note in snapshot.notes)


@pytest.mark.asyncio
async def test_log_view_streams_and_filters_by_typed_request_id(tmp_path: Path) -> None:
    path = tmp_path / "worker.err"
    path.write_text(json_line("request ok", "chatcmpl-aaa") + "\n" + json_line("request ok", "chatcmpl-bbb") + "\n")
    app = NetworkMonitor(FixedSource(), refresh_s=60, logs=TailLogSource(tmp_path))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("2")
        assert app.query_one(TabbedContent).active == "logs"
        table = app.query_one("#log", DataTable)
        assert table.row_count == 2
        await pilot.press("slash")
        await pilot.pause()
        assert app.query_one("#filter", Input).has_focus
        assert "typing a request id" in str(app.query_one("#log-status", Static).render())
        await pilot.press(*"bbb", "enter")
        assert [table.get_row_at(i)[2] for i in range(table.row_count)] == ["chatcmpl-bbb"]
        assert "1 of 2" in str(app.query_one("#log-status", Static).render())
        with path.open("a") as handle:  # new lines stream in, still filtered
            handle.write(json_line("late", "chatcmpl-bbb") + "\n" + json_line("other", "chatcmpl-ccc") + "\n")
        await app.action_refresh_now()
        assert [table.get_row_at(i)[3] for i in range(table.row_count)] == ["request ok", "late"]
        await pilot.press("slash", *["backspace"] * 3, "escape")
        assert table.row_count == 4 and app.log_filter == ""


@pytest.mark.asyncio
async def test_training_view_and_tab_keys() -> None:
    app = NetworkMonitor(FixedSource(), refresh_s=60, logs=ListLogs(), training=FixedTraining())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.query_one(TabbedContent).active == "training"
        rounds = app.query_one("#rounds", DataTable)
        assert [rounds.get_row_at(i)[6] for i in range(rounds.row_count)] == ["1.250", "1.500"]
        rewards = app.query_one("#rewards", DataTable)
        assert rewards.get_row_at(0) == ["WalletA", "2", "8,000 lamports"]
        assert app.query_one("#jobs", DataTable).get_row_at(0)[2] == "SUCCEEDED"
        await pilot.press("1")
        assert app.query_one(TabbedContent).active == "network"
