"""`solanalm up`'s head start (ensure_cluster), then the real `solanalm status` and `solanalm down`, all on
free ports: the head runs with token auth, the CLI finds the token, and `down` stops that head only."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.ray_cluster import head_processes, port_in_use
from tests.integration.security._heads import clean_env, free_port, run_driver

UP = """
import json, os
from pathlib import Path
from cluster.config import Settings
from cluster.ray_cluster import ensure_cluster

settings = Settings()  # SOLANALM_* from the environment, as the CLI reads them
handle = ensure_cluster(settings.ray, 2, settings.model.cache_dir / "state")
print(json.dumps({"env": handle.ray_env, "started_here": handle.started_here}))
"""


def _solanalm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("solanalm")), *args]
    return subprocess.run(command, env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=180)


@pytest.mark.slow  # ~85 s on the shared 2-core machine: a head, three CLI processes (each imports Ray)
def test_up_status_down_with_token_auth(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ports = {"HEAD_PORT": free_port(), "DASHBOARD_PORT": free_port(), "CLIENT_SERVER_PORT": free_port()}
    settings_env = {f"SOLANALM_RAY__{key}": str(port) for key, port in ports.items()}
    env = clean_env(tmp_path / "home", {**settings_env, "SOLANALM_MODEL__CACHE_DIR": str(cache)})
    (tmp_path / "home").mkdir()
    marker = cache / "state" / "local-head.json"
    mode_before = os.environ.get("RAY_AUTH_MODE")
    try:
        up = run_driver(UP, env, timeout_s=180)
        assert up.get("started_here") is True, up
        token = cache / "state" / "ray-auth-token"
        assert up["env"] == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        record = json.loads(marker.read_text())
        assert head_processes(record["session_dir"], str(ports["HEAD_PORT"]))

        status = _solanalm("status", env=env)
        assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]

        stranger = _solanalm("status", env={**env, "SOLANALM_MODEL__CACHE_DIR": str(tmp_path / "other")})
        assert stranger.returncode == 1, stranger.stdout[-2000:]
        assert "token" in " ".join(stranger.stdout.split())

        down = _solanalm("down", env=env)
        assert down.returncode == 0 and "stopped the local Ray head" in down.stdout, down.stdout + down.stderr
        assert head_processes(record["session_dir"], str(ports["HEAD_PORT"])) == []
        assert not port_in_use("127.0.0.1", ports["HEAD_PORT"]) and not marker.exists()
    finally:
        if marker.exists():  # the test failed midway: stop that head, and only it
            record = json.loads(marker.read_text())
            for proc in head_processes(record.get("session_dir") or "/nonexistent", str(ports["HEAD_PORT"])):
                proc.kill()
        assert os.environ.get("RAY_AUTH_MODE") == mode_before  # nothing leaked into this test process


@pytest.mark.slow  # a head, one CLI process that deploys and gives up, and the checks (~40 s)
def test_up_gives_up_at_its_deadline_saying_what_it_waited_for_and_leaves_nothing_running(tmp_path: Path) -> None:
    """A machine too slow for the deadline (here: a 2 s deadline): `up` exits 1 naming what it was still
    waiting for, and its Ray head, Serve and the application are gone (issue 18's first `make run`)."""
    cache = tmp_path / "cache"
    ports = {"HEAD_PORT": free_port(), "DASHBOARD_PORT": free_port(), "CLIENT_SERVER_PORT": free_port()}
    settings_env = {f"SOLANALM_RAY__{key}": str(port) for key, port in ports.items()}
    env = clean_env(
        tmp_path / "home",
        {**settings_env, "SOLANALM_MODEL__CACHE_DIR": str(cache), "SOLANALM_HTTP__STARTUP_TIMEOUT_S": "2"},
        fast_fail=False,
    )
    (tmp_path / "home").mkdir()
    http_port = free_port()
    marker = cache / "state" / "local-head.json"
    up = _solanalm("up", "--model", "tiny-llama", "--stages", "1", "--port", str(http_port), "--no-demo", env=env)
    out = " ".join((up.stdout + up.stderr).split())
    try:
        assert up.returncode == 1, out[-3000:]
        assert "start-up gave up: not ready after 2 s: still waiting for" in out, out[-3000:]
        assert "stopped the local Ray head" in out and "shut down cleanly" in out, out[-3000:]
        assert not marker.exists()
        assert not port_in_use("127.0.0.1", ports["HEAD_PORT"]) and not port_in_use("127.0.0.1", http_port)
    finally:
        if marker.exists():
            record = json.loads(marker.read_text())
            for proc in head_processes(record.get("session_dir") or "/nonexistent", str(ports["HEAD_PORT"])):
                proc.kill()
