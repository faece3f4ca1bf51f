"""A real Ray head started the way `solanalm up` starts one, on free ports, owned (and killed) by a test.

`ray stop` would stop every Ray process of this user (other tests' clusters too), so the head runs as
`ray start --head --block` in its own session and temp dir, and teardown kills exactly the processes
whose command line names that temp dir.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from cluster.config.serving import RaySection
from cluster.ray_cluster import head_launch, port_in_use

AUTH_AND_TLS_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_USE_TLS", "RAY_ADDRESS")
# Fail fast instead of retrying for a minute against a head that refuses this driver.
FAST_FAIL = {
    "RAY_gcs_rpc_server_reconnect_timeout_s": "5",
    "RAY_gcs_server_request_timeout_seconds": "5",
    "RAY_gcs_rpc_server_connect_timeout_s": "5",
    "RAY_py_gcs_connect_timeout_s": "10",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(home: Path, extra: Mapping[str, str] | None = None, fast_fail: bool = True) -> dict[str, str]:
    """This process's environment without any Ray auth/TLS/address variable, HOME at `home`."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_AND_TLS_VARS and not k.startswith("RAY_TLS_")}
    env = {k: v for k, v in env.items() if not k.startswith("SOLANALM_")}
    env.update(HOME=str(home), PYTHONPATH=str(Path.cwd()), **(FAST_FAIL if fast_fail else {}))
    env.update(extra or {})
    return env


@dataclass
class Head:
    section: RaySection
    state_dir: Path
    env: dict[str, str]  # what `solanalm up` adds for the head and its driver
    temp_dir: Path
    process: subprocess.Popen
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.section.head_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.section.dashboard_port}"

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        for proc in _processes_naming(self.temp_dir):
            proc.kill()


def _processes_naming(temp_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def start_head(base: Path, section_values: Mapping[str, object], extra_env: Mapping[str, str] | None = None) -> Head:
    """`solanalm up`'s head (head_launch: its command and security env) on free ports; waits for it."""
    values = {
        "head_port": free_port(),
        "dashboard_port": free_port(),
        "client_server_port": free_port(),
        "namespace": "solanalm-security",
    }
    section = RaySection.model_validate({**values, **section_values})
    state_dir = base / "state"
    command, env = head_launch(section, 2, state_dir)
    # Short path: Ray's raylet socket lives under the temp dir (Unix sockets allow ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="slm", dir="/tmp"))
    command += [
        "--block",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--object-store-memory=100000000",
    ]
    log = base / "head.log"
    home = base / "head-home"
    home.mkdir(exist_ok=True)
    process = subprocess.Popen(
        command,
        env=clean_env(home, {**env, **(extra_env or {})}, fast_fail=False),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    head = Head(section, state_dir, env, temp_dir, process, log)
    deadline = time.monotonic() + 120
    while not (port_in_use("127.0.0.1", section.head_port) and port_in_use("127.0.0.1", section.dashboard_port)):
        if process.poll() is not None or time.monotonic() > deadline:
            head.stop()
            raise RuntimeError(f"the Ray head did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return head


def run_driver(script: str, env: Mapping[str, str], timeout_s: float = 90) -> dict:
    """Run `script` in a fresh interpreter; its last JSON stdout line, or {"connected": False, ...} when Ray
    ended the process first (its C++ core exits a driver that cannot reach the GCS)."""
    result = subprocess.run(
        [sys.executable, "-c", script], env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"connected": False, "error": f"exit {result.returncode}", "stderr": result.stderr[-3000:]}
    return json.loads(lines[-1])
