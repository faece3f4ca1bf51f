"""`solanalm tui`: a Textual monitor of the network, rendering snapshots from a `SnapshotSource`.

Three views (keys 1, 2, 3): the network (nodes, stages, rates, earnings), the cluster's JSON logs as they
arrive (`/` to type a request id: only that request's lines), and training (jobs, rounds with loss and ε,
rewards per wallet). The app only renders: reading is the sources' job (each in a thread, so a slow Ray call
never freezes the screen), rates come from two consecutive snapshots (snapshot.rates_between).
"""

import asyncio
from collections import deque

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Input, Static, TabbedContent, TabPane

from cluster.observability.logs import LogEntry
from cluster.tui.snapshot import (
    JobView,
    LogSource,
    NodeView,
    Rates,
    Snapshot,
    SnapshotSource,
    StageView,
    TrainingSnapshot,
    TrainingSource,
    format_rate,
    rates_between,
)

NODE_COLUMNS = ("node", "wallet", "region", "hardware", "health", "reputation", "CPU", "GPU", "served", "failed")
STAGE_COLUMNS = ("model", "replica", "stage", "layers", "node", "wallet")
EARNING_COLUMNS = ("wallet", "nodes", "unpaid earnings")
LOG_COLUMNS = ("time", "level", "request", "message", "logger")  # fits 120 columns; the logger last
JOB_COLUMNS = ("job", "kind", "status", "duration s", "progress")
ROUND_COLUMNS = ("run", "round", "clients ok", "dropped", "train loss", "eval loss", "max client ε", "rewards")
REWARD_COLUMNS = ("wallet", "rounds", "rewards")
LOG_BUFFER = 2000  # entries kept for re-filtering
LOG_ROWS = 500  # rows shown (the newest matching)


class NetworkMonitor(App[None]):
    """Nodes, pipelines and where their stages run, requests/s and tokens/s, earnings per wallet; live logs
    filterable by request id; training jobs, rounds and rewards."""

    TITLE = "SolanaLM network"
    CSS = """
    DataTable { height: auto; max-height: 16; margin-bottom: 1; }
    #log { height: 1fr; max-height: 100%; }
    #rates, #log-status, #training-notes { padding: 0 1; }
    #notes, #training-notes { color: $warning; padding: 0 1; }
    """
    BINDINGS = [
        ("q", "quit", "Quit"),
        ("r", "refresh_now", "Refresh"),
        ("1", "show_tab('network')", "Network"),
        ("2", "show_tab('logs')", "Logs"),
        ("3", "show_tab('training')", "Training"),
        ("slash", "filter_logs", "Filter by request id"),
        Binding("escape", "leave_filter", "Leave filter", show=False),
    ]

    def __init__(
        self,
        source: SnapshotSource,
        refresh_s: float = 2.0,
        logs: LogSource | None = None,
        training: TrainingSource | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.logs = logs
        self.training = training
        self.refresh_s = refresh_s
        self.snapshot: Snapshot | None = None
        self.training_snapshot: TrainingSnapshot | None = None
        self.rates = Rates()
        self.log_entries: deque[LogEntry] = deque(maxlen=LOG_BUFFER)
        self.log_filter = ""
        self._reading = asyncio.Lock()
        self._reading_training = asyncio.Lock()

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="network"):
            with TabPane("1 Network", id="network"):
                yield Static("waiting for the first snapshot...", id="rates")
                yield Static("", id="notes")
                yield DataTable(id="nodes", zebra_stripes=True)
                yield DataTable(id="stages", zebra_stripes=True)
                yield DataTable(id="earnings", zebra_stripes=True)
            with TabPane("2 Logs", id="logs"):
                yield Input(placeholder="request id (/ to type, Enter or Esc to leave)", id="filter")
                yield Static("", id="log-status")
                yield DataTable(id="log", zebra_stripes=True, cursor_type="row")
            with TabPane("3 Training", id="training"):
                yield Static("", id="training-notes")
                yield DataTable(id="jobs", zebra_stripes=True)
                yield DataTable(id="rounds", zebra_stripes=True)
                yield DataTable(id="rewards", zebra_stripes=True)
        yield Footer()

    async def on_mount(self) -> None:
        tables = (
            ("nodes", NODE_COLUMNS),
            ("stages", STAGE_COLUMNS),
            ("earnings", EARNING_COLUMNS),
            ("log", LOG_COLUMNS),
            ("jobs", JOB_COLUMNS),
            ("rounds", ROUND_COLUMNS),
            ("rewards", REWARD_COLUMNS),
        )
        for table_id, columns in tables:
            self.query_one(f"#{table_id}", DataTable).add_columns(*columns)
        self._show_log_status()
        await self.action_refresh_now()
        self.set_interval(self.refresh_s, self.action_refresh_now)

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_filter_logs(self) -> None:
        self.action_show_tab("logs")
        self.query_one("#filter", Input).focus()
        self.call_after_refresh(self._show_log_status)

    def on_descendant_blur(self) -> None:
        self._show_log_status()

    def action_leave_filter(self) -> None:
        self.query_one("#log", DataTable).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.log_filter = event.value.strip()
            self._render_logs()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.action_leave_filter()

    async def action_refresh_now(self) -> None:
        """Read one snapshot (and new log lines, and training) off the UI thread and render them; a refresh
        already running is not doubled, and a slow training read does not hold up the rest."""
        if self.training is not None and not self._reading_training.locked():
            self.run_worker(self._refresh_training(), exclusive=False, group="training")
        if self._reading.locked():
            return
        async with self._reading:
            snapshot = await asyncio.to_thread(self.source.read)
            entries = await asyncio.to_thread(self.logs.read_new) if self.logs is not None else []
        self.show(snapshot)
        self.add_logs(entries)

    async def _refresh_training(self) -> None:
        if self.training is None:
            return
        async with self._reading_training:
            training = await asyncio.to_thread(self.training.read)
        self.show_training(training)

    def show(self, snapshot: Snapshot) -> None:
        self.rates = rates_between(self.snapshot.counters if self.snapshot else None, snapshot.counters)
        self.snapshot = snapshot
        self.query_one("#rates", Static).update(self._rates_line(snapshot))
        self.query_one("#notes", Static).update("; ".join(snapshot.notes))
        self._fill("nodes", [_node_row(n) for n in snapshot.nodes])
        self._fill("stages", [_stage_row(s) for p in snapshot.pipelines for s in p.stages])
        self._fill("earnings", [(e.wallet, str(e.nodes), _amount(e.unpaid, e.asset)) for e in snapshot.earnings])

    def add_logs(self, entries: list[LogEntry]) -> None:
        """Keep new entries; show those matching the filter (the newest LOG_ROWS)."""
        if not entries:
            return
        self.log_entries.extend(entries)
        table = self.query_one("#log", DataTable)
        matching = [e for e in entries if e.matches(self.log_filter)]
        if table.row_count + len(matching) > LOG_ROWS:
            self._render_logs()
            return
        for entry in matching:
            table.add_row(*_log_row(entry))
        self._show_log_status()

    def show_training(self, training: TrainingSnapshot) -> None:
        self.training_snapshot = training
        self.query_one("#training-notes", Static).update("; ".join(training.notes))
        self._fill("jobs", [_job_row(j) for j in training.jobs])
        self._fill(
            "rounds",
            [
                (
                    r.run,
                    str(r.round),
                    str(r.completed),
                    str(r.dropped),
                    _num(r.train_loss, ".4f"),
                    _num(r.eval_loss, ".4f"),
                    _num(r.epsilon, ".3f"),
                    f"{r.rewards_lamports:,} lamports",
                )
                for r in training.rounds
            ],
        )
        self._fill("rewards", [(w.wallet, str(w.rounds), f"{w.lamports:,} lamports") for w in training.rewards])

    def visible_logs(self) -> list[LogEntry]:
        """The buffered entries the filter lets through, newest LOG_ROWS."""
        return [e for e in self.log_entries if e.matches(self.log_filter)][-LOG_ROWS:]

    def _render_logs(self) -> None:
        self._fill("log", [_log_row(e) for e in self.visible_logs()])
        self._show_log_status()

    def _show_log_status(self) -> None:
        shown = self.query_one("#log", DataTable).row_count
        where = f"request id contains {self.log_filter!r}" if self.log_filter else "all requests"
        source = "" if self.logs is not None else " (no log source)"
        typing = "; typing a request id (Enter or Esc when done)" if self.query_one("#filter", Input).has_focus else ""
        status = f"{shown} of {len(self.log_entries)} log lines, {where}{source}{typing}"
        self.query_one("#log-status", Static).update(status)

    def _rates_line(self, snapshot: Snapshot) -> str:
        pipelines = ", ".join(
            f"{p.model}: {p.replicas} replica(s), queue {p.queue_depth if p.queue_depth is not None else '?'}, "
            f"running {p.running if p.running is not None else '?'}"
            for p in snapshot.pipelines
        )
        return (
            f"requests/s {format_rate(self.rates.requests_per_s, '')}  "
            f"tokens/s {format_rate(self.rates.tokens_per_s, '')}  "
            f"decode steps/s {format_rate(self.rates.steps_per_s, '')}\n"
            f"nodes {len(snapshot.nodes)}  pipelines: {pipelines or 'none'}"
        )

    def _fill(self, table_id: str, rows: list[tuple[str, ...]]) -> None:
        table = self.query_one(f"#{table_id}", DataTable)
        table.clear()
        for row in rows:
            table.add_row(*row)


def _short(value: str | None, width: int = 12) -> str:
    return "-" if not value else (value if len(value) <= width else value[:width] + "…")


def _node_row(n: NodeView) -> tuple[str, ...]:
    reputation = "-" if n.reputation is None else f"{n.reputation:.2f}"
    return (
        _short(n.node_id),
        _short(n.wallet, 10),
        n.region or "-",
        n.hardware,
        n.health,
        reputation,
        f"{n.cpus:g}",
        f"{n.gpus:g}",
        str(n.requests_served),
        str(n.failures),
    )


def _stage_row(s: StageView) -> tuple[str, ...]:
    return (
        s.model,
        _short(s.replica),
        str(s.index),
        s.layers,
        _short(s.node_id) if s.node_id else "unreachable",
        _short(s.wallet, 10),
    )


def _amount(value: int | None, asset: str) -> str:
    return "n/a" if value is None else f"{value:,} {asset}".strip()


def _log_row(e: LogEntry) -> tuple[str, ...]:
    clock = e.ts[11:23] if len(e.ts) >= 23 else e.ts  # HH:MM:SS.mmm of the ISO stamp
    return (clock, e.level, e.request_id or "-", e.message[:40], e.logger.rsplit(".", 1)[-1])


def _job_row(j: JobView) -> tuple[str, ...]:
    return (_short(j.job_id, 20), j.kind, j.status, _num(j.duration_s, ".1f"), j.progress[:80])


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
