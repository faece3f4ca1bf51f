"""Joining and leaving the provider network: start a labelled Ray worker node, prove the wallet, register.

Join order: (1) `ray start --address <head> --labels solanalm.io/wallet=...,solanalm.io/join=<token>`
starts this machine's Ray node; (2) a driver connects and finds the node by its one-time join token;
(3) the registry issues a challenge bound to that node id and wallet; (4) the wallet signs it; (5) the
registry verifies the signature and that the live node carries the wallet label, and records the node.
Until then the node is in Ray but not in the registry, so placement gives it no stages and payments
no pay. Every subprocess goes through `run_command`, so tests check command lines without Ray.
"""

import json
import logging
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from solders.keypair import Keypair

from cluster.config.network import NetworkSection
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.registry import get_registry
from cluster.network.wallet import load_keypair, sign_challenge

logger = logging.getLogger(__name__)

LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")  # Ray's (Kubernetes') rule
Runner = Callable[[list[str]], Any]


class JoinError(RuntimeError):
    """Joining or leaving failed; the message says at which step."""


@dataclass(frozen=True, slots=True)
class JoinedNode:
    """What `join` leaves behind for `leave` (also written to the state file)."""

    node_id: str
    address: str
    wallet: str


def ray_cli() -> str:
    """The `ray` next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def run_command(command: list[str]) -> subprocess.CompletedProcess[str]:
    """The one place that runs a subprocess (JoinError with its output when it fails)."""
    logger.info("running: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise JoinError(f"{' '.join(command[:2])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def node_labels(
    prefix: str,
    wallet: str,
    join_token: str,
    region: str = "",
    hardware: str = "cpu",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The Ray node labels of a provider: wallet, region, hardware, the join token, and extra labels."""
    labels = {f"{prefix}/wallet": wallet, f"{prefix}/hardware": hardware, f"{prefix}/join": join_token}
    if region:
        labels[f"{prefix}/region"] = region
    labels.update(extra or {})
    for key, value in labels.items():
        if key.startswith("ray.io/") or not LABEL_VALUE.match(value):
            raise JoinError(f"invalid node label {key}={value!r} (values: <= 63 of [A-Za-z0-9_.-])")
    return labels


def ray_start_command(
    address: str,
    labels: Mapping[str, str],
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    resources: Mapping[str, float] | None = None,
    block: bool = False,
) -> list[str]:
    """`ray start` for a worker node joining `address` with `labels` (Ray 2.55: --labels "k=v,k2=v2")."""
    command = [
        ray_cli(),
        "start",
        f"--address={address}",
        "--disable-usage-stats",
        "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
    ]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    if resources:
        command.append(f"--resources={json.dumps(dict(resources))}")
    if block:
        command.append("--block")
    return command


def ray_stop_command() -> list[str]:
    return [ray_cli(), "stop"]


def measure_throughput_gflops(duration_s: float = 0.3, size: int = 256, trials: int = 5) -> float:
    """Dense float32 matmul GFLOP/s of this machine (a relative speed for placement): the best of `trials`
    windows after a warm-up, so a busy moment or the thread pool's start-up does not pass for a slow machine
    (on a loaded 2-core VM single 0.3 s windows ranged 2-260 GFLOP/s)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b  # warm-up: OpenMP's threads start on the first call
    best = 0.0
    for _ in range(max(1, trials)):
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration_s / max(1, trials):
            a @ b
            runs += 1
        best = max(best, 2.0 * size**3 * runs / elapsed / 1e9)
    return best


def local_capabilities(gpu_memory_bytes: int = 0, measure_s: float = 0.3) -> NodeCapabilities:
    """The claimed capabilities of this machine (Ray's resource view overrides CPU/GPU/memory)."""
    import psutil

    return NodeCapabilities(
        num_cpus=float(psutil.cpu_count() or 1),
        memory_bytes=int(psutil.virtual_memory().available),
        gpu_memory_bytes=gpu_memory_bytes,
        throughput_gflops=measure_throughput_gflops(measure_s),
    )


def find_node_by_label(key: str, value: str, timeout_s: float, poll_s: float = 0.5) -> str:
    """The id of the live Ray node labelled key=value (JoinError after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for node in ray.nodes():
            if node.get("Alive") and (node.get("Labels") or {}).get(key) == value:
                return str(node["NodeID"])
        if time.monotonic() > deadline:
            raise JoinError(f"no live Ray node labelled {key}={value} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def prove_and_register(
    registry: Any,
    node_id: str,
    keypair: Keypair,
    capabilities: NodeCapabilities,
    timeout_s: float,
) -> NodeRecord:
    """Ask the registry for a challenge for `node_id`, sign it with the wallet, register."""
    try:
        challenge = ray.get(registry.issue_challenge.remote(node_id, str(keypair.pubkey())), timeout=timeout_s)
        proof = sign_challenge(keypair, challenge)
        return ray.get(registry.register.remote(proof, capabilities), timeout=timeout_s)
    except (GetTimeoutError, RayActorError) as exc:
        raise JoinError(f"registry unreachable while registering {node_id}: {exc}") from exc


def join(
    address: str,
    keypair_path: Path,
    settings: NetworkSection,
    namespace: str,
    region: str = "",
    extra_labels: Mapping[str, str] | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    capabilities: NodeCapabilities | None = None,
    runner: Runner = run_command,
    block: bool = False,
) -> tuple[JoinedNode, NodeRecord]:
    """Start this machine's labelled Ray node in the cluster at `address`, prove the wallet, register."""
    keypair = load_keypair(keypair_path)
    wallet, token = str(keypair.pubkey()), secrets.token_hex(8)
    labels = node_labels(settings.label_prefix, wallet, token, region, "gpu" if num_gpus else "cpu", extra_labels)
    runner(ray_start_command(address, labels, num_cpus, num_gpus, block=block))
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, log_to_driver=False, configure_logging=False)
    node_id = find_node_by_label(f"{settings.label_prefix}/join", token, settings.join_timeout_s)
    try:
        registry = get_registry(settings, namespace)
    except ValueError as exc:
        raise JoinError(
            f"the cluster runs no registry {settings.registry_name!r} "
            "(the operator starts it: `solanalm node registry`)"
        ) from exc
    record = prove_and_register(
        registry, node_id, keypair, capabilities or local_capabilities(), settings.registry_call_timeout_s
    )
    return JoinedNode(node_id=node_id, address=address, wallet=wallet), record


def leave(
    node: JoinedNode,
    settings: NetworkSection,
    namespace: str,
    runner: Runner = run_command,
    stages_on: Callable[[str], Sequence[str]] | None = None,
    poll_s: float = 1.0,
) -> bool:
    """Mark the node draining (no new stages), wait up to drain_timeout_s for its stages to be moved by
    the serving side, then `ray stop`. Returns whether it drained in time."""
    if not ray.is_initialized():
        ray.init(address=node.address, namespace=namespace, log_to_driver=False, configure_logging=False)
    registry = get_registry(settings, namespace)
    ray.get(registry.set_draining.remote(node.node_id, True), timeout=settings.registry_call_timeout_s)
    drained = wait_for_drain(node.node_id, settings.drain_timeout_s, stages_on or stage_actors_on, poll_s)
    ray.shutdown()
    runner(ray_stop_command())
    return drained


def wait_for_drain(
    node_id: str, timeout_s: float, stages_on: Callable[[str], Sequence[str]], poll_s: float = 1.0
) -> bool:
    deadline = time.monotonic() + timeout_s
    while stages := stages_on(node_id):
        if time.monotonic() > deadline:
            logger.warning(
                "node %s still runs %d stages after %.0f s; leaving anyway", node_id[:12], len(stages), timeout_s
            )
            return False
        time.sleep(poll_s)
    return True


def stage_actors_on(node_id: str) -> list[str]:
    """Names of live pipeline stage actors (`stage:...`) on the node (Ray state API; needs the dashboard)."""
    from ray.util.state import list_actors

    try:
        actors = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], limit=1000)
    except Exception as exc:  # noqa: BLE001 - no dashboard: nothing to wait for is the safe answer
        logger.warning("cannot list actors on %s (%s); not waiting for a drain", node_id[:12], exc)
        return []
    return [a.name for a in actors if a.name and a.name.startswith("stage:")]


def write_state(path: Path, node: JoinedNode) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"node_id": node.node_id, "address": node.address, "wallet": node.wallet}))


def read_state(path: Path) -> JoinedNode:
    try:
        return JoinedNode(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise JoinError(f"{path}: no joined node recorded here ({exc})") from exc
