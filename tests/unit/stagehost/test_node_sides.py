"""The training side of a node (a stand-in command for `solanalm provider train`): its threads and priority,
and a stop that waits for the round in progress; `provider mode` / `provider status` over a running endpoint;
the ClientApp's thread cap and round file (train_jobs)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.config.provider import HybridSection
from serve_apps.stagehost.cli import app
from serve_apps.stagehost.control import ControlServer
from serve_apps.stagehost.modes import ModeController
from serve_apps.stagehost.node_sides import ROUND_FILE, SuperNodeProcess, TrainingOptions, train_command
from train_jobs.fl_client import _holding, _threads
from train_jobs.fl_deploy import supernode_command

from .test_modes import FakeStages, FakeTraining

# Holds the round file for `hold` seconds, records its threads and priority, then idles like a SuperNode.
ROUND = """
import os, sys, time, json, pathlib
state = pathlib.Path(sys.argv[1]); hold = float(sys.argv[2])
(state / "seen.json").write_text(json.dumps({"omp": os.environ.get("OMP_NUM_THREADS"), "threads": sys.argv[3],
                                             "nice": os.getpriority(os.PRIO_PROCESS, 0)}))
(state / "round-in-progress").touch(); time.sleep(hold); (state / "round-in-progress").unlink()
time.sleep(600)
"""


def options(tmp_path: Path) -> TrainingOptions:
    return TrainingOptions("link:9092", tmp_path / "w.json", tmp_path / "data", tmp_path / "ca.pem", tmp_path)


def stand_in(hold_s: float):  # type: ignore[no-untyped-def]
    return lambda opts, threads: [sys.executable, "-c", ROUND, str(opts.state_dir), str(hold_s), str(threads)]


def wait_for_file(path: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_training_runs_with_its_threads_niced_and_stops_after_its_round(tmp_path: Path) -> None:
    side = SuperNodeProcess(options(tmp_path), nice=7, command=stand_in(0.6), poll_s=0.05)
    assert side.configured and side.round_file == tmp_path / ROUND_FILE
    side.start(3)
    wait_for_file(tmp_path / "seen.json")
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert (seen["omp"], seen["threads"]) == ("3", "3")
    assert seen["nice"] >= os.getpriority(os.PRIO_PROCESS, 0) + 7
    wait_for_file(tmp_path / ROUND_FILE)
    started = time.monotonic()
    assert side.running() and side.stop(timeout_s=20) is True
    assert time.monotonic() - started >= 0.2  # it waited for the round, then stopped
    assert not side.running() and not (tmp_path / ROUND_FILE).exists()


def test_a_round_past_the_timeout_is_abandoned(tmp_path: Path) -> None:
    side = SuperNodeProcess(options(tmp_path), nice=0, command=stand_in(60.0), poll_s=0.05)
    side.start(1)
    wait_for_file(tmp_path / ROUND_FILE)
    assert side.stop(timeout_s=0.3) is False and not side.running()
    assert SuperNodeProcess(None).configured is False


def test_the_training_command_is_provider_train_with_the_thread_cap(tmp_path: Path) -> None:
    command = train_command(options(tmp_path), 2)
    assert command[1:3] == ["provider", "train"] and command[command.index("--torch-threads") + 1] == "2"
    node = supernode_command("l:1", tmp_path, tmp_path, tmp_path, tmp_path, 9, torch_threads=2, round_file=tmp_path)
    config = node[node.index("--node-config") + 1]
    assert "torch-threads=2" in config and f'round-file="{tmp_path}"' in config


def test_the_client_app_caps_its_threads_and_holds_the_round_file(tmp_path: Path) -> None:
    assert _threads(None, None) is None and _threads(4, None) == 4 and _threads(None, 2) == 2
    assert _threads(4, 2) == 2 and _threads(1, "3") == 1 and _threads(4, "") == 4
    marker = tmp_path / "round"
    with pytest.raises(RuntimeError), _holding(marker):
        assert marker.exists()
        raise RuntimeError("the round failed")
    assert not marker.exists()


def test_provider_mode_and_status_talk_to_the_running_node(tmp_path: Path) -> None:
    log: list[str] = []
    node = ModeController(FakeStages(log), FakeTraining(log), 4, HybridSection(), 5.0, 5.0)
    server = ControlServer(tmp_path, node)
    server.start()
    try:
        runner = CliRunner()
        result = runner.invoke(app, ["mode", "hybrid", "--state-dir", str(tmp_path), "--wait"])
        assert result.exit_code == 0, result.output
        status = json.loads(result.stdout.splitlines()[0])
        assert (status["mode"], status["serve_threads"], status["train_threads"]) == ("hybrid", 2, 2)
        result = runner.invoke(app, ["status", "--state-dir", str(tmp_path)])
        assert result.exit_code == 0 and json.loads(result.stdout.splitlines()[0])["mode"] == "hybrid"
        assert runner.invoke(app, ["mode", "mining", "--state-dir", str(tmp_path)]).exit_code == 2
    finally:
        server.stop()
    assert CliRunner().invoke(app, ["status", "--state-dir", str(tmp_path)]).exit_code == 1
