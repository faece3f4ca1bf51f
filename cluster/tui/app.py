"""`solanalm tui`: a Textual monitor of the network, rendering snapshots from a `SnapshotSource`.

The app only renders: reading the cluster is the source's job (a thread, so a slow Ray call never
freezes the screen), rates come from two consecutive snapshots (snapshot.rates_between).
"""

import asyncio

from textual.app import App, ComposeResult
from textual.widgets import DataTable, Footer, Header, Static

from cluster.tui.snapshot import NodeView, Rates, Snapshot, SnapshotSource, StageView, format_rate, rates_between

NODE_COLUMNS = ("node", "wallet", "region", "hardware", "health", "reputation", "CPU", "GPU", "served", "failed")
STAGE_COLUMNS = ("model", "replica", "stage", "layers", "node", "wallet")
EARNING_COLUMNS = ("wallet", "nodes", "unpaid earnings")


class NetworkMonitor(App[None]):
    """Nodes, pipelines and where their stages run, requests/s and tokens/s, earnings per wallet."""

    TITLE = "SolanaLM network"
    CSS = """
    DataTable { height: auto; max-height: 16; margin-bottom: 1; }
    #rates { padding: 0 1; }
    #notes { color: $warning; padding: 0 1; }
    """
    BINDINGS = [("q", "quit", "Quit"), ("r", "refresh_now", "Refresh")]

    def __init__(self, source: SnapshotSource, refresh_s: float = 2.0) -> None:
        super().__init__()
        self.source = source
        self.refresh_s = refresh_s
        self.snapshot: Snapshot | None = None
        self.rates = Rates()
        self._reading = asyncio.Lock()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("waiting for the first snapshot...", id="rates")
        yield Static("", id="notes")
        yield DataTable(id="nodes", zebra_stripes=True)
        yield DataTable(id="stages", zebra_stripes=True)
        yield DataTable(id="earnings", zebra_stripes=True)
        yield Footer()

    async def on_mount(self) -> None:
        for table_id, columns in (("nodes", NODE_COLUMNS), ("stages", STAGE_COLUMNS), ("earnings", EARNING_COLUMNS)):
            self.query_one(f"#{table_id}", DataTable).add_columns(*columns)
        await self.action_refresh_now()
        self.set_interval(self.refresh_s, self.action_refresh_now)

    async def action_refresh_now(self) -> None:
        """Read one snapshot off the UI thread and render it (a refresh already running is not doubled)."""
        if self._reading.locked():
            return
        async with self._reading:
            snapshot = await asyncio.to_thread(self.source.read)
        self.show(snapshot)

    def show(self, snapshot: Snapshot) -> None:
        self.rates = rates_between(self.snapshot.counters if self.snapshot else None, snapshot.counters)
        self.snapshot = snapshot
        self.query_one("#rates", Static).update(self._rates_line(snapshot))
        self.query_one("#notes", Static).update("; ".join(snapshot.notes))
        self._fill("nodes", [_node_row(n) for n in snapshot.nodes])
        self._fill("stages", [_stage_row(s) for p in snapshot.pipelines for s in p.stages])
        self._fill("earnings", [(e.wallet, str(e.nodes), _amount(e.unpaid, e.asset)) for e in snapshot.earnings])

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
