"""Finding, starting and stopping the Ray cluster that SolanaLM runs on."""

import json
import logging
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import ray

from cluster.config.serving import RaySection

logger = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """Ray is not reachable or could not be started; the message says what to do."""


@dataclass(frozen=True, slots=True)
class ClusterHandle:
    address: str
    dashboard_url: str | None
    started_here: bool


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0


def ensure_cluster(section: RaySection, num_cpus: int, state_dir: Path) -> ClusterHandle:
    """Join `section.address`, or the local head on head_port if one runs, or start one."""
    if section.address:
        return _connect(section.address, section.namespace, started_here=False)
    local = f"127.0.0.1:{section.head_port}"
    if port_in_use("127.0.0.1", section.head_port):
        return _connect(local, section.namespace, started_here=_head_marker(state_dir).exists())
    _start_head(section, num_cpus)
    _head_marker(state_dir).parent.mkdir(parents=True, exist_ok=True)
    _head_marker(state_dir).write_text(json.dumps({"address": local}))
    return _connect(local, section.namespace, started_here=True)


def connect_existing(section: RaySection) -> ClusterHandle:
    """Join a running cluster (for status/down); ClusterError with advice when none runs."""
    address = section.address or f"127.0.0.1:{section.head_port}"
    if not section.address and not port_in_use("127.0.0.1", section.head_port):
        raise ClusterError(f"no Ray cluster is running at {address}; start one with `solanalm up`")
    return _connect(address, section.namespace, started_here=False)


def stop_local_head(state_dir: Path) -> bool:
    """`ray stop` the head that `solanalm up` started (and only that one)."""
    marker = _head_marker(state_dir)
    if not marker.exists():
        return False
    if ray.is_initialized():
        ray.shutdown()
    subprocess.run([_ray_cli(), "stop", "--force"], check=False, capture_output=True)
    marker.unlink(missing_ok=True)
    return True


def _start_head(section: RaySection, num_cpus: int) -> None:
    command = [
        _ray_cli(),
        "start",
        "--head",
        f"--port={section.head_port}",
        f"--num-cpus={num_cpus}",
        f"--dashboard-host={section.dashboard_host}",
        f"--dashboard-port={section.dashboard_port}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    if port_in_use("127.0.0.1", section.dashboard_port):
        raise ClusterError(f"port {section.dashboard_port} (Ray dashboard) is taken; set SOLANALM_RAY__DASHBOARD_PORT")
    logger.info("starting a local Ray head: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"`ray start --head` failed:\n{result.stderr.strip() or result.stdout.strip()}")


def _connect(address: str, namespace: str, started_here: bool) -> ClusterHandle:
    if not ray.is_initialized():
        try:
            context = ray.init(address=address, namespace=namespace, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as exc:
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
        dashboard = context.dashboard_url
    else:
        dashboard = getattr(ray.get_runtime_context(), "dashboard_url", None)
    url = f"http://{dashboard}" if dashboard and not str(dashboard).startswith("http") else dashboard
    return ClusterHandle(address, url or None, started_here)


def _head_marker(state_dir: Path) -> Path:
    return state_dir / "local-head.json"


def _ray_cli() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")
