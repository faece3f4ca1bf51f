"""Finding, starting and stopping the Ray cluster that SolanaLM runs on.

A head started here runs with Ray's token auth (and TLS when `ray.tls`); every driver this module
connects gets the same RAY_AUTH_*/RAY_TLS_* variables first (cluster/security/ray_auth.py, ray_tls.py).
"""

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ray
from ray.exceptions import AuthenticationError

from cluster.config.serving import RaySection
from cluster.security.ray_auth import RayAuthError, apply_to_process, driver_env, head_env
from cluster.security.ray_tls import RayTlsError, tls_env

logger = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """Ray is not reachable or could not be started; the message says what to do."""


@dataclass(frozen=True, slots=True)
class ClusterHandle:
    address: str
    dashboard_url: str | None
    started_here: bool
    ray_env: dict[str, str] = field(default_factory=dict)  # RAY_AUTH_*/RAY_TLS_* this driver connected with


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0


def ensure_cluster(section: RaySection, num_cpus: int, state_dir: Path) -> ClusterHandle:
    """Join `section.address`, or the local head on head_port if one runs, or start one (token auth on)."""
    if section.address:
        return _connect(section.address, section.namespace, False, _driver_env(section, state_dir))
    local = f"127.0.0.1:{section.head_port}"
    if port_in_use("127.0.0.1", section.head_port):
        started_here = _head_marker(state_dir).exists()
        return _connect(local, section.namespace, started_here, _driver_env(section, state_dir))
    command, env = head_launch(section, num_cpus, state_dir)
    _start_head(section, command, env)
    handle = _connect(local, section.namespace, True, {k: v for k, v in env.items() if k != "PATH"})
    _head_marker(state_dir).parent.mkdir(parents=True, exist_ok=True)
    _head_marker(state_dir).write_text(json.dumps({"address": local, "session_dir": _session_dir()}))
    return handle


def connect_existing(section: RaySection, state_dir: Path) -> ClusterHandle:
    """Join a running cluster (for status/down); ClusterError with advice when none runs."""
    address = section.address or f"127.0.0.1:{section.head_port}"
    gcs = _gcs_host_port(address)
    if gcs is not None and not port_in_use(*gcs):
        raise ClusterError(f"no Ray cluster is running at {address}; start one with `solanalm up`")
    return _connect(address, section.namespace, False, _driver_env(section, state_dir))


def _gcs_host_port(address: str) -> tuple[str, int] | None:
    """host and port of a plain `host:port` address (checked before ray.init, which waits long on a dead one);
    None for `auto`, `ray://` client addresses and anything else Ray resolves itself."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    return host, int(port)


def prepare_driver(section: RaySection, state_dir: Path) -> dict[str, str]:
    """Give this process the token (and TLS files) of the cluster it is about to `ray.init` into, found as
    `solanalm status` finds them; for entry points that call ray.init themselves. Returns what was set
    ({} when Ray is already connected here, or nothing was found)."""
    env = _driver_env(section, state_dir)
    return env if apply_to_process(env) else {}


def head_command(section: RaySection, num_cpus: int) -> list[str]:
    """The `ray start --head` command line of a local head."""
    return [
        _ray_cli(),
        "start",
        "--head",
        f"--port={section.head_port}",
        f"--num-cpus={num_cpus}",
        f"--dashboard-host={section.dashboard_host}",
        f"--dashboard-port={section.dashboard_port}",
        f"--ray-client-server-port={section.client_server_port}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]


def head_launch(section: RaySection, num_cpus: int, state_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command and the extra environment (token auth, TLS, PATH) of a local head `solanalm up` starts."""
    return head_command(section, num_cpus), {**_security_env(section, state_dir, head=True), "PATH": head_path()}


def head_path() -> str:
    """PATH for the head: this environment's bin first, so a job's `python` (`ray job submit -- python -m
    ...`) is the interpreter SolanaLM runs in, with Ray and the project, even when `make run` started the
    head from a shell without the venv activated. Not resolved: a venv's python is a symlink."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _security_env(section: RaySection, state_dir: Path, head: bool) -> dict[str, str]:
    """RAY_AUTH_* (head: the token created if missing) and RAY_TLS_* variables; ClusterError with advice."""
    try:
        auth = head_env(section, state_dir) if head else driver_env(section, state_dir)
        return {**auth, **tls_env(section, state_dir)}
    except (RayAuthError, RayTlsError) as exc:
        raise ClusterError(str(exc)) from exc


def _driver_env(section: RaySection, state_dir: Path) -> dict[str, str]:
    return _security_env(section, state_dir, head=False)


def stop_local_head(state_dir: Path) -> bool:
    """Stop the head that `solanalm up` started, and only that one (`ray stop` would end every Ray
    process of this user, other clusters on the machine included)."""
    marker = _head_marker(state_dir)
    if not marker.exists():
        return False
    record = json.loads(marker.read_text() or "{}")
    if ray.is_initialized():
        ray.shutdown()
    if record.get("session_dir"):
        port = str(record.get("address", "")).rpartition(":")[2]
        _terminate(head_processes(record["session_dir"], port))
    else:  # a marker written before sessions were recorded: only `ray stop` can find the head
        subprocess.run([_ray_cli(), "stop", "--force"], check=False, capture_output=True)
    marker.unlink(missing_ok=True)
    return True


def head_processes(session_dir: str, gcs_port: str) -> list[psutil.Process]:
    """This user's Ray processes of one head: those naming its session dir or its GCS port."""
    port = re.compile(rf":{re.escape(gcs_port)}\b") if gcs_port else None
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            args = proc.info["cmdline"] or []
            if proc.info["uids"].real != os.getuid() or not any("ray" in a for a in args):
                continue
            if any(session_dir in a for a in args) or (port and any(port.search(a) for a in args)):
                # Agents and workers rename themselves (ray::IDLE): they are found as the raylet's children.
                for member in [proc, *proc.children(recursive=True)]:
                    found[member.pid] = member
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _terminate(processes: list[psutil.Process], grace_s: float = 5.0) -> None:
    # SIGTERM first (what `ray stop` sends), SIGKILL whatever is still there after the grace period.
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _session_dir() -> str | None:
    # The connected driver knows the head's session dir (/tmp/ray/session_...); every process of that
    # head names it in its command line.
    node = getattr(ray._private.worker.global_worker, "node", None)
    return node.get_session_dir_path() if node is not None else None


def _start_head(section: RaySection, command: list[str], env: dict[str, str]) -> None:
    if port_in_use("127.0.0.1", section.dashboard_port):
        raise ClusterError(f"port {section.dashboard_port} (Ray dashboard) is taken; set SOLANALM_RAY__DASHBOARD_PORT")
    logger.info("starting a local Ray head: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **env})
    if result.returncode != 0:
        raise ClusterError(f"`ray start --head` failed:\n{result.stderr.strip() or result.stdout.strip()}")


def _connect(address: str, namespace: str, started_here: bool, env: dict[str, str]) -> ClusterHandle:
    if not ray.is_initialized():
        applied = apply_to_process(env)  # before ray.init: Ray reads these when it connects
        try:
            context = ray.init(address=address, namespace=namespace, log_to_driver=False, configure_logging=False)
        except AuthenticationError as exc:
            raise ClusterError(_refused(address, exc.message)) from exc
        except (ConnectionError, RuntimeError) as exc:
            if _auth_refused(exc):  # Ray wraps the GCS's InvalidAuthToken in a ConnectionError
                raise ClusterError(_refused(address, str(exc.__cause__))) from exc
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
        dashboard = context.dashboard_url
    else:
        applied = False
        dashboard = getattr(ray.get_runtime_context(), "dashboard_url", None)
    url = f"http://{dashboard}" if dashboard and not str(dashboard).startswith("http") else dashboard
    return ClusterHandle(address, url or None, started_here, dict(env) if applied else {})


def _auth_refused(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, AuthenticationError) or "InvalidAuthToken" in f"{exc} {cause}"


def _refused(address: str, detail: str) -> str:
    return (
        f"the Ray cluster at {address} wants a token this driver lacks or has wrong ({detail.strip()[:200]}); "
        "export RAY_AUTH_TOKEN_PATH=<the cluster's token file> (or RAY_AUTH_TOKEN), or run where `solanalm up` "
        "wrote it (<state dir>/ray-auth-token)"
    )


def _head_marker(state_dir: Path) -> Path:
    return state_dir / "local-head.json"


def _ray_cli() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")
