"""Real processes for the trust-domain tests: an operator Ray head with token authentication, `solanalm up`
deploying onto it, and providers' `solanalm provider serve` processes that are not members of that cluster.

Every process runs in its own process group and is stopped by signalling that group only: `ray stop` would
stop every Ray process of this machine, the shared test cluster's included.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from cluster.security import certs

BIN = Path(sys.executable).parent
TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def stop_group(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = TIMEOUT_S) -> None:
    """Signal the process's group; SIGKILL it when it does not exit in time."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class Operator:
    """A token-authenticated Ray head (`ray start --head --block`) and `solanalm up --address` onto it."""

    work: Path
    overrides: dict[str, str]
    https: bool = False  # the gateway (Serve's proxy) with a certificate from a CA made here
    gcs_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    operator_token: str = field(default_factory=lambda: secrets.token_hex(32))  # the gateway's detail views
    processes: list[subprocess.Popen] = field(default_factory=list)
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="slm-op-", dir="/tmp"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def ca_path(self) -> Path:
        return self.work / "tls" / "ca.crt"

    @property
    def verify(self) -> str | bool:
        """What clients verify the gateway's certificate with."""
        return str(self.ca_path) if self.https else True

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"{self.base_url}{path}", verify=self.verify, timeout=30, **kwargs)  # type: ignore[arg-type]

    def get_detail(self, path: str) -> httpx.Response:
        """The operator's view of `path` (/healthz, /v1/network/nodes): ?detail=1 with the operator token."""
        return self.get(f"{path}?detail=1", headers={"Authorization": f"Bearer {self.operator_token}"})

    def openai(self, timeout_s: float = 300) -> openai.OpenAI:
        http = httpx.Client(verify=self.verify, timeout=timeout_s)
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="open", max_retries=2, http_client=http)

    @property
    def token_path(self) -> Path:
        return self.work / "ray_auth_token"

    def env(self) -> dict[str, str]:
        """The operator's environment: the token, and settings for this head's ports."""
        env = dict(os.environ)
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "SOLANALM_RAY__ADDRESS": self.address,
                "SOLANALM_HTTP__PORT": str(self.http_port),
                "SOLANALM_HTTP__OPERATOR_TOKEN": self.operator_token,
                **self.overrides,
            }
        )
        if self.https:
            env["SOLANALM_HTTP__SSL_CERTFILE"] = str(self.work / "tls" / "gateway.crt")
            env["SOLANALM_HTTP__SSL_KEYFILE"] = str(self.work / "tls" / "gateway.key")
        env.pop("RAY_AUTH_TOKEN", None)
        return env

    def start(self, up_timeout_s: float = 600.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(self.token)
        self.token_path.chmod(0o600)
        if self.https:
            ca = certs.create_ca()
            (self.work / "tls").mkdir(exist_ok=True)
            self.ca_path.write_bytes(ca.cert_pem)
            certs.issue(ca, ["127.0.0.1", "localhost"]).write(
                self.work / "tls" / "gateway.crt", self.work / "tls" / "gateway.key"
            )
        ports = {name: free_port() for name in PORT_FLAGS}
        head = [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}", "--num-cpus=8"]
        head += [f"--{flag}={port}" for flag, port in ports.items()]
        head += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        self._spawn(head, self.work / "head.log")
        wait_until(lambda: _port_open(self.gcs_port), TIMEOUT_S, "the operator's Ray head")
        up = [str(BIN / "solanalm"), "up", "--address", self.address, "--block", "--no-demo"]
        self._spawn(up, self.work / "up.log")
        wait_until(self.ready, up_timeout_s, f"`solanalm up` (log: {self.work / 'up.log'})")

    def ready(self) -> bool:
        if self.processes[-1].poll() is not None:
            raise AssertionError(f"`solanalm up` exited:\n{(self.work / 'up.log').read_text()[-4000:]}")
        try:
            return self.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def _spawn(self, command: list[str], log: Path) -> None:
        out = log.open("wb")
        process = subprocess.Popen(
            command, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT
        )
        self.processes.append(process)

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_group(process)
        # Keep the cluster's logs beside the test's other files (a failure's evidence), then drop the rest.
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        if logs.is_dir():
            shutil.copytree(logs, self.work / "ray-logs", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


PORT_FLAGS = (
    "dashboard-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
REPO_ROOT = Path(__file__).resolve().parents[3]
# Every node's declared speed: measured ones swing 10x on a busy 2-core machine and would make the plan random.
GFLOPS = "300"


def operator_overrides(model: str, cache_dir: Path, work: Path, max_stages: int, max_num_seqs: int) -> dict[str, str]:
    """The operator settings both trust tests share: one model, a 1-stage start, fast re-planning."""
    return {
        "SOLANALM_MODEL__SERVED": json.dumps([model]),
        "SOLANALM_MODEL__CACHE_DIR": str(cache_dir),
        "SOLANALM_PIPELINE__NUM_STAGES": "1",
        "SOLANALM_PIPELINE__MAX_NUM_SEQS": str(max_num_seqs),
        "SOLANALM_PIPELINE__GRACEFUL_SHUTDOWN_TIMEOUT_S": "5",
        "SOLANALM_PAYMENTS__STATE_DIR": str(work / "payments"),
        "SOLANALM_NETWORK__PLACEMENT__WATCH_INTERVAL_S": "1",
        "SOLANALM_NETWORK__PLACEMENT__MAX_STAGES": str(max_stages),
        "SOLANALM_NETWORK__PLACEMENT__MIN_STAGE_GAIN": "0",
        "SOLANALM_NETWORK__PLACEMENT__OPERATOR_THROUGHPUT_GFLOPS": GFLOPS,
    }


@dataclass
class Provider:
    """`solanalm provider serve` on "its own machine": its own HOME, no Ray token, only the gateway's URL."""

    name: str
    work: Path
    gateway: str
    model: str
    cache_dir: Path
    extra_args: list[str] = field(default_factory=list)
    module: str | None = None  # a test-only entry point instead of the CLI (a cheating provider)
    process: subprocess.Popen | None = None
    ready_line: dict = field(default_factory=dict)

    @property
    def keypair_path(self) -> Path:
        return self.work / "id.json"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SOLANALM_"))}
        env["HOME"] = str(self.work / "home")
        return env

    def start(self, timeout_s: float = 300.0) -> dict:
        (self.work / "home").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(BIN / "solanalm"), "provider", "keygen", str(self.keypair_path)], check=True, env=self.env()
        )
        entry = [str(BIN / "solanalm")] if self.module is None else [sys.executable, "-m", self.module]
        command = [*entry, "provider", "serve"] if self.module is None else [*entry]
        command += ["--gateway", self.gateway, "--wallet", str(self.keypair_path), "--model", self.model]
        command += ["--cache-dir", str(self.cache_dir), "--catalogue", str(REPO_ROOT / "configs" / "models.yaml")]
        command += ["--host", "127.0.0.1", "--state-dir", str(self.work / "state"), *self.extra_args]
        log = (self.work / "provider.log").open("wb")
        self.process = subprocess.Popen(
            command, env=self.env(), stdout=subprocess.PIPE, stderr=log, start_new_session=True, cwd=REPO_ROOT
        )
        self.ready_line = _first_json_line(self.process, timeout_s, self.work / "provider.log")
        return self.ready_line

    @property
    def wallet(self) -> str:
        return str(self.ready_line["wallet"])

    @property
    def provider_id(self) -> str:
        return str(self.ready_line["provider_id"])

    def kill(self) -> None:
        if self.process is not None:
            stop_group(self.process, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)


def _first_json_line(process: subprocess.Popen, timeout_s: float, log: Path) -> dict:
    box: dict = {}

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    box["line"] = json.loads(line)
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if "line" not in box:
        raise AssertionError(f"the provider printed no ready line in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")
    return box["line"]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def operator_and_providers(
    work: Path, overrides: dict[str, str], providers: list[dict], https: bool = False
) -> Iterator[tuple[Operator, list[Provider]]]:
    operator = Operator(work / "operator", overrides, https)
    started: list[Provider] = []
    try:
        operator.start()
        for spec in providers:
            provider = Provider(work=work / spec["name"], gateway=operator.base_url, **spec)
            if operator.https:
                provider.extra_args = [*provider.extra_args, "--ca-cert", str(operator.ca_path)]
            started.append(provider)
            provider.start()
        yield operator, started
    finally:
        for provider in started:
            provider.stop()
        operator.stop()
