"""Dashboards: valid JSON, up to date, every query's metric names exported by the code; provisioning them."""

import importlib.util
import json
import re
import socket
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from cluster.observability.cli import app
from cluster.observability.grafana import DASHBOARDS_DIR, DATASOURCE_UID, FOLDER_UID, load_dashboards
from cluster.observability.metrics import exported_names
from payments import metrics as payments_metrics
from serve_apps import metrics as serve_metrics
from tests.unit.ops.fake_grafana import fake_grafana
from train_jobs import metrics as train_metrics

REPO = Path(__file__).resolve().parents[3]
SPECS = serve_metrics.SPECS + payments_metrics.SPECS + train_metrics.SPECS
METRIC_NAME = re.compile(r"\b(ray_solanalm_[a-z0-9_]+|solanalm_[a-z0-9_]+)\b")


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboards", REPO / "k8s" / "grafana" / "build_dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exprs(board: dict) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    return exprs


def test_the_four_dashboards_are_committed_and_up_to_date() -> None:
    rendered = _builder().render()
    assert {path.name for path in rendered} == {
        "solanalm-overview.json",
        "solanalm-serving.json",
        "solanalm-payments.json",
        "solanalm-training.json",
    }
    for path, text in rendered.items():
        assert path.read_text() == text, f"{path.name} is stale: run python k8s/grafana/build_dashboards.py"


def test_dashboards_are_well_formed() -> None:
    boards = load_dashboards()
    assert len({board["uid"] for board in boards}) == len(boards)
    for board in boards:
        assert board["title"] and board["panels"] and board["schemaVersion"] >= 36
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"].count("(") == t["expr"].count(")") for t in panel["targets"])
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"}


def test_every_queried_metric_is_one_the_code_exports_and_every_metric_is_shown() -> None:
    exported = exported_names(SPECS)
    used: set[str] = set()
    for board in load_dashboards():
        for expr in _exprs(board):
            names = set(METRIC_NAME.findall(expr))
            assert names, f"{board['uid']}: no SolanaLM metric in {expr!r}"
            unknown = names - exported
            assert not unknown, f"{board['uid']}: {sorted(unknown)} are not exported (known: {sorted(exported)})"
            used |= names
    unshown = [spec.name for spec in SPECS if not set(spec.exported_names()) & used]
    assert not unshown, f"metrics on no dashboard: {unshown}"


def test_provision_creates_datasource_folder_and_dashboards_then_updates_them() -> None:
    with fake_grafana() as (url, state):
        args = ["provision", "--url", url, "--token", state.token, "--prometheus-url", "http://prom:9090"]
        first = CliRunner().invoke(app, args)
        assert first.exit_code == 0, first.output
        assert "created" in first.output
        assert state.paths("POST").count("/api/dashboards/db") == 4
        assert state.datasources[DATASOURCE_UID]["url"] == "http://prom:9090"
        assert state.datasources[DATASOURCE_UID]["type"] == "prometheus"
        assert FOLDER_UID in state.folders
        for body in state.dashboards.values():
            assert body["overwrite"] is True and body["folderUid"] == FOLDER_UID and body["dashboard"]["id"] is None
        serving = state.dashboards["solanalm-serving"]["dashboard"]
        assert serving["templating"]["list"][0]["current"]["value"] == DATASOURCE_UID
        assert all(call.authorization == f"Bearer {state.token}" for call in state.calls)

        second = CliRunner().invoke(app, args)
        assert second.exit_code == 0, second.output
        assert "updated" in second.output
        assert f"/api/datasources/uid/{DATASOURCE_UID}" in state.paths("PUT")
        assert state.paths("POST").count("/api/folders") == 1  # the folder existed the second time


def test_a_bad_token_or_no_grafana_is_a_clear_error() -> None:
    with fake_grafana() as (url, state):
        result = CliRunner().invoke(app, ["provision", "--url", url, "--token", "wrong"])
        assert result.exit_code == 1 and "401" in result.output
        assert not state.dashboards
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    result = CliRunner().invoke(app, ["provision", "--url", f"http://127.0.0.1:{closed}", "--token", "t"])
    assert result.exit_code == 1 and "error" in result.output


def test_an_empty_dashboards_dir_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["provision", "--url", "http://x", "--dashboards-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no dashboard JSON" in result.output


def test_the_plugin_is_declared_for_the_solanalm_command() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["solanalm.commands"]
    assert declared["grafana"] == "cluster.observability.cli:app"


@pytest.mark.parametrize("path", sorted(DASHBOARDS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_dashboard_files_parse(path: Path) -> None:
    assert json.loads(path.read_text())["tags"] == ["solanalm"]
