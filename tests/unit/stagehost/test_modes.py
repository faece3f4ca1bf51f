"""A provider node's modes: the CPU split, the ordered steps between modes, the controller over fake sides,
and the local control endpoint (token, malformed and oversized requests)."""

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from cluster.config import Settings
from cluster.config.provider import HybridSection, ProviderSection
from serve_apps.stagehost.control import MAX_REQUEST_BYTES, TOKEN_NAME, ControlError, ControlServer, call
from serve_apps.stagehost.modes import ModeController, ModeError, NodeState, ResourceSplit, split_resources, transition

SERVING = NodeState(serving=True, training=False, serve_threads=8, train_threads=0)
TRAINING = NodeState(serving=False, training=True, serve_threads=0, train_threads=8)
HYBRID = NodeState(serving=True, training=True, serve_threads=4, train_threads=4)


def test_serving_and_training_take_every_cpu_and_hybrid_splits_them() -> None:
    hybrid = HybridSection()
    assert split_resources(8, "serving", hybrid) == ResourceSplit(8, 0)
    assert split_resources(8, "training", hybrid) == ResourceSplit(0, 8)
    assert split_resources(8, "hybrid", hybrid) == ResourceSplit(4, 4)
    assert split_resources(8, "hybrid", HybridSection(train_cpu_fraction=0.25)) == ResourceSplit(6, 2)
    assert split_resources(8, "hybrid", HybridSection(train_threads=3)) == ResourceSplit(5, 3)
    assert split_resources(3, "hybrid", hybrid) == ResourceSplit(2, 1)


def test_serving_keeps_its_floor_and_a_machine_too_small_to_split_shares() -> None:
    # Serving has priority: training never takes the stage host's last min_serve_threads.
    assert split_resources(8, "hybrid", HybridSection(train_threads=8, min_serve_threads=2)) == ResourceSplit(2, 6)
    assert split_resources(1, "hybrid", HybridSection()) == ResourceSplit(1, 1)
    assert split_resources(4, "hybrid", HybridSection(min_serve_threads=4)) == ResourceSplit(4, 1)
    with pytest.raises(ValueError):
        split_resources(0, "serving", HybridSection())


def test_the_split_is_configured_in_the_one_settings_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOLANALM_PROVIDER__HYBRID__TRAIN_THREADS", "3")
    monkeypatch.setenv("SOLANALM_PROVIDER__MODE", "hybrid")
    settings = Settings()
    assert (settings.provider.mode, settings.provider.hybrid.train_threads) == ("hybrid", 3)
    with pytest.raises(ValueError):
        ProviderSection(hybrid={"train_cpu_fraction": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ProviderSection(mode="mining")  # type: ignore[arg-type]


def test_to_training_drains_the_stages_before_training_starts() -> None:
    assert transition(SERVING, "training", ResourceSplit(0, 8)) == ["drain_stages", "start_training"]
    assert transition(HYBRID, "training", ResourceSplit(0, 8)) == ["drain_stages", "stop_training", "start_training"]


def test_back_to_serving_ends_training_before_the_stages_register_again() -> None:
    assert transition(TRAINING, "serving", ResourceSplit(8, 0)) == [
        "stop_training",
        "set_serve_threads",
        "register_stages",
    ]
    assert transition(HYBRID, "serving", ResourceSplit(8, 0)) == ["stop_training", "set_serve_threads"]


def test_hybrid_cuts_serving_to_its_share_before_training_takes_the_rest() -> None:
    assert transition(SERVING, "hybrid", ResourceSplit(4, 4)) == ["set_serve_threads", "start_training"]
    assert transition(TRAINING, "hybrid", ResourceSplit(4, 4)) == [
        "stop_training",
        "set_serve_threads",
        "start_training",
        "register_stages",
    ]


def test_a_mode_already_reached_needs_no_step() -> None:
    assert transition(SERVING, "serving", ResourceSplit(8, 0)) == []
    assert transition(HYBRID, "hybrid", ResourceSplit(4, 4)) == []
    with pytest.raises(ValueError):
        transition(SERVING, "mining", ResourceSplit(8, 0))  # type: ignore[arg-type]


class FakeStages:
    def __init__(self, log: list[str], drained: bool = True) -> None:
        self.log, self.drained = log, drained
        self.gate = threading.Event()
        self.gate.set()

    def drain(self, timeout_s: float) -> bool:
        self.gate.wait(5)
        self.log.append("drain")
        return self.drained

    def register(self) -> None:
        self.log.append("register")

    def set_threads(self, threads: int) -> None:
        self.log.append(f"serve-threads={threads}")

    def describe(self) -> dict[str, Any]:
        return {"stages": 1, "open_streams": 0}


class FakeTraining:
    def __init__(self, log: list[str], configured: bool = True) -> None:
        self.log, self.configured, self.alive = log, configured, False

    def start(self, threads: int) -> None:
        self.log.append(f"train-start={threads}")
        self.alive = True

    def stop(self, timeout_s: float) -> bool:
        self.log.append("train-stop")
        self.alive = False
        return True

    def running(self) -> bool:
        return self.alive


def controller(log: list[str], configured: bool = True, stages: FakeStages | None = None) -> ModeController:
    return ModeController(stages or FakeStages(log), FakeTraining(log, configured), 8, HybridSection(), 5.0, 5.0)


def test_the_controller_runs_a_round_trip_in_order_and_reports_it() -> None:
    log: list[str] = []
    node = controller(log)
    assert node.switch("training", wait=True).mode == "training"
    status = node.status()
    assert (status.serving, status.training, status.serve_threads, status.train_threads) == (False, True, 0, 8)
    node.switch("hybrid", wait=True)
    node.switch("serving", wait=True)
    assert log == [
        "drain",
        "train-start=8",
        "train-stop",
        "serve-threads=4",
        "train-start=4",
        "register",
        "train-stop",
        "serve-threads=8",
    ]
    final = node.status()
    assert (final.mode, final.phase, final.serving, final.training) == ("serving", "settled", True, False)
    assert final.error is None


def test_one_switch_at_a_time_and_its_phase_is_visible() -> None:
    log: list[str] = []
    stages = FakeStages(log)
    stages.gate.clear()  # the drain waits
    node = controller(log, stages=stages)
    started = node.switch("training")
    assert (started.mode, started.target, started.phase) == ("serving", "training", "drain_stages")
    with pytest.raises(ModeError, match="in progress"):
        node.switch("serving")
    stages.gate.set()
    node.join(5)
    assert node.status().mode == "training"


def test_training_modes_need_training_configured() -> None:
    node = controller([], configured=False)
    with pytest.raises(ModeError, match="no training configured"):
        node.switch("hybrid")
    with pytest.raises(ModeError):
        node.switch("mining")  # type: ignore[arg-type]


def test_a_failed_step_is_reported_and_the_node_keeps_what_it_reached() -> None:
    log: list[str] = []

    class Broken(FakeTraining):
        def start(self, threads: int) -> None:
            raise OSError("no flower-supernode")

    node = ModeController(FakeStages(log), Broken(log), 8, HybridSection(), 5.0, 5.0)
    node.switch("training", wait=True)
    status = node.status()
    assert (status.mode, status.phase, status.serving) == ("serving", "failed", False)
    assert "no flower-supernode" in (status.error or "")
    node.switch("serving", wait=True)  # the way back registers the stages again
    assert log[-1] == "register" and node.status().mode == "serving"


@pytest.fixture
def endpoint(tmp_path: Path) -> Any:
    node = controller([])
    # A short directory: unix socket paths are limited to ~100 bytes.
    server = ControlServer(tmp_path, node)
    server.start()
    yield server, tmp_path
    server.stop()


def raw_call(path: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        return json.loads(sock.makefile("rb").readline())  # type: ignore[no-any-return]


def test_the_control_endpoint_switches_and_reports_with_the_token(endpoint: Any) -> None:
    server, state = endpoint
    assert (state / TOKEN_NAME).stat().st_mode & 0o777 == 0o600
    assert server.socket_path.stat().st_mode & 0o077 == 0
    assert call(state, "status")["mode"] == "serving"
    call(state, "mode", mode="training")
    server.controller.join(5)
    status = call(state, "status")
    assert (status["mode"], status["train_threads"], status["stage_host"]["stages"]) == ("training", 8, 1)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b'{"op": "status"}\n', "token"),
        (b'{"token": "guess", "op": "status"}\n', "token"),
        (b'{"token": 7, "op": "status"}\n', "token"),
        (b"not json\n", "JSON"),
        (b"[1, 2]\n", "JSON"),
        (b"\xff\xfe\n", "JSON"),
        (b"x" * (MAX_REQUEST_BYTES + 10) + b"\n", "bytes"),
    ],
)
def test_the_control_endpoint_refuses_bad_requests(endpoint: Any, payload: bytes, error: str) -> None:
    server, _ = endpoint
    answer = raw_call(server.socket_path, payload)
    assert answer["ok"] is False and error in answer["error"]
    assert server.controller.status().target == "serving"


@pytest.mark.parametrize(
    "fields", [{"op": "mode", "mode": "mining"}, {"op": "mode", "mode": ["training"]}, {"op": "mode"}, {"op": "rm"}]
)
def test_the_control_endpoint_refuses_bad_fields(endpoint: Any, fields: dict[str, Any]) -> None:
    server, state = endpoint
    token = (state / TOKEN_NAME).read_text()
    answer = raw_call(server.socket_path, json.dumps({"token": token, **fields}).encode() + b"\n")
    assert answer["ok"] is False
    assert server.controller.status().target == "serving"


def test_no_running_node_is_a_control_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no running provider node"):
        call(tmp_path, "status")
