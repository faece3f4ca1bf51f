"""The monitor's pure layer (rates, metrics, rows) and the Textual app on a fake snapshot source (pilot)."""

import pytest
from textual.widgets import DataTable, Static

from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.tui.app import NetworkMonitor
from cluster.tui.snapshot import (
    Counters,
    EarningView,
    NodeView,
    PipelineView,
    Rates,
    Snapshot,
    StageView,
    earnings_by_wallet,
    rates_between,
    sum_metrics,
)
from cluster.tui.source import group_pipelines, nodes_from

EXPOSITION = """# HELP solanalm_requests_total Requests.
# TYPE solanalm_requests_total counter
solanalm_requests_total{model="tiny-llama",status="200"} 7.0
solanalm_requests_total{model="tiny-llama",status="503"} 1.0
# TYPE other_total counter
other_total 99.0
"""


def test_rates_are_counter_differences_per_second() -> None:
    before, after = Counters(10.0, 100, 1000, 50), Counters(12.0, 110, 1400, 90)
    assert rates_between(before, after) == Rates(5.0, 200.0, 20.0)
    assert rates_between(None, after) == Rates()
    assert rates_between(after, after) == Rates()  # no time passed
    reset = rates_between(before, Counters(12.0, 3, None, 60))  # a restarted replica, no token counter
    assert reset == Rates(None, None, 5.0)


def test_metrics_are_summed_over_series_and_nodes() -> None:
    assert sum_metrics([EXPOSITION, EXPOSITION], ["solanalm_requests_total"]) == 16.0
    assert sum_metrics([EXPOSITION], ["solanalm_completion_tokens_total"]) is None


def test_nodes_join_ray_and_the_registry_and_earnings_group_by_wallet() -> None:
    ray_nodes = [
        {"NodeID": "head", "Alive": True, "Resources": {"CPU": 4.0}, "Labels": {}},
        {
            "NodeID": "p1",
            "Alive": False,
            "Resources": {"CPU": 2.0},
            "Labels": {"solanalm.io/hardware": "cpu", "solanalm.io/region": "eu"},
        },
    ]
    records = [
        NodeRecord("p1", "W1", region="eu", health="dead", reputation=0.4, requests_served=3),
        NodeRecord("p2", "W1", capabilities=NodeCapabilities(num_cpus=1.0), reputation=0.6),
    ]
    nodes = nodes_from(ray_nodes, records, "solanalm.io")
    assert [(n.node_id, n.wallet, n.health, n.cpus) for n in nodes] == [
        ("head", None, "alive", 4.0),
        ("p1", "W1", "dead", 2.0),
        ("p2", "W1", "alive", 1.0),
    ]
    assert earnings_by_wallet(nodes, {"W1": (1234, "lamports")}) == [EarningView("W1", 1234, "lamports", 2)]
    assert earnings_by_wallet(nodes, {}) == [EarningView("W1", None, "", 2)]


def test_stages_group_into_pipelines_by_model() -> None:
    stages = [
        StageView("m", "r1", 0, "0-5", "p1"),
        StageView("m", "r1", 1, "5-6", "p2"),
        StageView("m", "r2", 0, "0-6", "head"),
        StageView("n", "r3", 0, "0-2", None),
    ]

    class Info:
        queue_depth, running = 2, 1

    views = group_pipelines(stages, {"m": Info()})
    assert [(v.model, v.replicas, len(v.stages), v.queue_depth) for v in views] == [("m", 2, 3, 2), ("n", 1, 1, None)]


class FakeSource:
    """A scripted network: each read advances the counters and can move a stage."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self) -> Snapshot:
        self.reads += 1
        node = "p2" if self.reads > 1 else "p1"
        return Snapshot(
            nodes=(
                NodeView("p1", "WalletOne", "eu", "cpu", "alive", 0.5, 2, 0, 10, 1),
                NodeView("p2", "WalletTwo", "us", "gpu", "draining", None, 4, 1),
            ),
            pipelines=(
                PipelineView("tiny-llama", (StageView("tiny-llama", "rep", 0, "0-6", node, "WalletOne"),), 0, 1),
            ),
            earnings=(EarningView("WalletOne", 4200, "lamports", 1),),
            counters=Counters(float(self.reads), requests=10.0 * self.reads, tokens=None, steps=40.0 * self.reads),
            notes=("no solanalm_* request metrics",) if self.reads == 1 else (),
        )


def cells(app: NetworkMonitor, table_id: str) -> list[list[str]]:
    table = app.query_one(f"#{table_id}", DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


@pytest.mark.asyncio
async def test_the_monitor_renders_snapshots_and_rates() -> None:
    source = FakeSource()
    app = NetworkMonitor(source, refresh_s=3600)
    async with app.run_test() as pilot:
        await pilot.pause()
        assert cells(app, "nodes")[0][:6] == ["p1", "WalletOne", "eu", "cpu", "alive", "0.50"]
        assert cells(app, "nodes")[1][4:6] == ["draining", "-"]
        assert cells(app, "stages") == [["tiny-llama", "rep", "0", "0-6", "p1", "WalletOne"]]
        assert cells(app, "earnings") == [["WalletOne", "1", "4,200 lamports"]]
        assert "no solanalm_* request metrics" in str(app.query_one("#notes", Static).render())
        assert "requests/s n/a" in str(app.query_one("#rates", Static).render())

        await pilot.press("r")
        await pilot.pause()
        assert source.reads == 2 and cells(app, "stages")[0][4] == "p2"  # the stage moved
        rates = str(app.query_one("#rates", Static).render())
        assert "requests/s 10.00" in rates and "tokens/s n/a" in rates and "decode steps/s 40.00" in rates
        await pilot.press("q")
    assert app.return_code == 0


def test_solanalm_has_a_tui_command() -> None:
    from typer.testing import CliRunner

    from cluster.cli import app

    result = CliRunner().invoke(app, ["tui", "--help"])
    assert result.exit_code == 0 and "--refresh" in result.output
