"""`solanalm tui` over a terminal as SSH gives it: run in tmux (120x40), keys in, screen captured.

Against the embedded deployment of this package: the local node, the JSON log line of a real request found
by typing its id into the filter, and the training view over a federated run summary written by the
coordinator's own FederatedSummary.write (train_jobs.fl_server).
"""

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cluster.network.registry import call_registry, get_registry
from tests.integration.embedded.conftest import MODEL, NAMESPACE, Embedded

WIDTH, HEIGHT = 120, 40


class Tmux:
    """A tmux server of its own (-L socket), so no other session on the machine is touched."""

    def __init__(self) -> None:
        self.socket = f"solanalm-tui-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "tui")

    def wait_for(self, ok: Callable[[str], bool], timeout_s: float, what: str) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            screen = self.screen()
            if ok(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not on screen after {timeout_s:.0f} s:\n{screen}")
            time.sleep(0.5)


def _write_summary(output_dir: Path) -> None:
    from train_jobs.fl_server import FederatedSummary, RoundStats

    wallet = "WalletTmux1111111111111111111111111111111111"
    summary = FederatedSummary(job="fl-tmux", eval_loss_before=3.0)
    for number, loss, epsilon in ((1, 2.5, 0.75), (2, 2.25, 1.125)):
        summary.rounds.append(
            RoundStats(
                round=number,
                selected=[wallet],
                completed=[wallet],
                dropped=[],
                round_time_s=1.0,
                client_time_s={wallet: 1.0},
                examples={wallet: 4},
                client_epsilon={wallet: epsilon},
                round_epsilon={wallet: epsilon},
                train_loss=loss,
                rewards_lamports={wallet: 4000},
            )
        )
    summary.write(output_dir / "fl-tmux")


@pytest.fixture
def tmux(embedded: Embedded, tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (make install puts it in)")
    _write_summary(tmp_path / "train")
    settings = embedded.settings
    env = {
        "SOLANALM_NETWORK__REGISTRY_NAME": settings.network.registry_name,
        "SOLANALM_HTTP__APP_NAME": settings.http.app_name,
        "SOLANALM_TRAINING__OUTPUT_DIR": str(tmp_path / "train"),
        "SOLANALM_MODEL__CACHE_DIR": str(settings.model.cache_dir),
        # Through the environment, not --address: with another SOLANALM_RAY__* variable set, the CLI's
        # Settings(ray=RaySection(address=...)) loses the option to the environment's `ray` section.
        "SOLANALM_RAY__ADDRESS": embedded.address,
        "SOLANALM_RAY__AUTH": "disabled",  # the test cluster runs without token auth
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "TERM": "xterm-256color",
    }
    solanalm = str(Path(sys.executable).with_name("solanalm"))
    command = ["env", *(f"{k}={v}" for k, v in env.items()), solanalm, "tui"]
    command += ["--refresh", "1"]
    session = Tmux()
    # remain-on-exit: a TUI that exits leaves its last screen (its error) to capture.
    session("new-session", "-d", "-x", str(WIDTH), "-y", str(HEIGHT), "-s", "tui", " ".join(command))
    session("set-option", "-t", "tui", "remain-on-exit", "on")
    try:
        yield session
    finally:
        subprocess.run(["tmux", "-L", session.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.slow  # a tmux session with `solanalm tui` (imports Ray, connects): ~20 s on the shared machine
def test_tui_in_tmux_shows_node_logs_of_a_request_and_training(embedded: Embedded, tmux: Tmux) -> None:
    (record,) = call_registry(get_registry(embedded.settings.network, NAMESPACE), "list_nodes", timeout_s=30)
    # The CLI's start (imports, Ray connect) took up to ~40 s on the shared 2-core machine under load.
    screen = tmux.wait_for(lambda s: record.wallet[:10] in s, 150, "the local node's wallet")
    assert "1 Network" in screen and "alive" in screen

    tmux("send-keys", "-t", "tui", "3")
    screen = tmux.wait_for(lambda s: "fl-tmux" in s and "WalletTmux" in s, 30, "the training view")
    assert "1.125" in screen and "2.2500" in screen and "8,000 lamports" in screen

    reply = httpx.post(
        embedded.base_url + "/completions",
        json={"model": MODEL, "prompt": "Hello tmux", "max_tokens": 4, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    # The gateway's id first; Serve's proxy adds its own x-request-id (httpx joins them with ", ").
    request_id = reply.headers["x-request-id"].split(",")[0].strip()
    assert request_id.startswith("cmpl-"), request_id

    tmux("send-keys", "-t", "tui", "2")
    tmux.wait_for(lambda s: "log lines" in s, 30, "the log view")
    tmux("send-keys", "-t", "tui", "/")
    # Keys typed before the filter has focus would be taken as commands (1-3 switch views): wait for it.
    tmux.wait_for(lambda s: "typing a request id" in s, 30, "the focused filter")
    tmux("send-keys", "-t", "tui", "-l", request_id)
    tmux.wait_for(lambda s: f"contains '{request_id}'" in s, 30, "the typed filter")
    tmux("send-keys", "-t", "tui", "Enter")
    screen = tmux.wait_for(
        lambda s: request_id[:24] in s and "request ok" in s and "request id contains" in s, 60, "the filtered line"
    )
    others = [line for line in screen.splitlines() if "cmpl-" in line and request_id[:24] not in line]
    assert others == [], screen  # only this request's lines pass the filter

    tmux("send-keys", "-t", "tui", "q")
