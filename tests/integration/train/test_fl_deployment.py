"""Flower's deployment engine across trust domains: a real SuperLink (TLS, SuperNode authentication) and
two real SuperNode processes, each with its own data directory and wallet, key bound to the wallet;
a third node whose key was never admitted is refused. Two tiny rounds of the same ServerApp/ClientApp
the simulation runs, with DP-SGD; no Ray involved."""

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from solders.keypair import Keypair

from cluster.network.wallet import write_keypair
from cluster.security.certs import create_ca, issue
from train_jobs.config import FederatedJob
from train_jobs.data import bundled_dataset_path
from train_jobs.fl_deploy import (
    LinkTls,
    admit_node,
    flower_env,
    submit_run,
    superlink_command,
    supernode_command,
    write_connection,
)
from train_jobs.node_keys import bind_node_key, ensure_node_key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Processes this test starts, each in its own session so its Flower children go with it."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.stop()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(log.read_text()[-3000:])


def _provider(root: Path, name: str, lines: list[str], offset: int) -> tuple[Path, Path, Path, Keypair]:
    """A provider machine: its own data directory, wallet and SuperNode key."""
    home = root / name
    data = home / "data"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("\n".join(lines[offset::2]) + "\n")
    keypair = Keypair()
    wallet = write_keypair(keypair, home / "wallet.json")
    key, _ = ensure_node_key(home / "state")
    return data, wallet, key, keypair


def test_superlink_and_two_supernodes_train_two_rounds(
    tmp_path: Path, model_cache_dir: Path, repo_root: Path, processes: Processes
) -> None:
    ca = create_ca()
    server = issue(ca, ["127.0.0.1", "localhost"], "solanalm-superlink")
    tls = LinkTls(tmp_path / "ca.pem", tmp_path / "superlink.pem", tmp_path / "superlink.key")
    tls.ca_cert.write_bytes(ca.cert_pem)
    tls.cert.write_bytes(server.cert_pem)
    tls.key.write_bytes(server.key_pem)
    port = _free_port()
    operator_home = tmp_path / "operator-flwr"
    link_log = tmp_path / "superlink.log"
    link = processes.start(superlink_command(tls, "127.0.0.1", port), flower_env(operator_home), link_log)
    write_connection(operator_home, f"127.0.0.1:{port}", tls.ca_cert)

    lines = bundled_dataset_path().read_text().splitlines()[:80]
    providers = [_provider(tmp_path, name, lines, i) for i, name in enumerate(("provider-a", "provider-b"))]
    _, _, stranger_key, _ = _provider(tmp_path, "stranger", lines, 0)
    out = tmp_path / "run"
    _wait_listening(port, link, link_log)
    proven = {str(keypair.pubkey()) for *_, keypair in providers}  # what the registry lists as proven
    for _, _, key, keypair in providers:
        admit_node(operator_home, bind_node_key(keypair, key.with_suffix(".pub").read_text()), proven.__contains__)

    nodes = []
    for i, (data, wallet, key, _) in enumerate(providers):
        command = supernode_command(f"127.0.0.1:{port}", tls.ca_cert, key, data, wallet, _free_port())
        nodes.append(processes.start(command, flower_env(tmp_path / f"node-{i}"), tmp_path / f"node-{i}.log"))
    stranger_log = tmp_path / "stranger.log"
    stranger_command = supernode_command(
        f"127.0.0.1:{port}", tls.ca_cert, stranger_key, providers[0][0], providers[0][1], _free_port(), max_retries=0
    )
    stranger = processes.start(stranger_command, flower_env(tmp_path / "node-x"), stranger_log)

    job = FederatedJob.model_validate(
        {
            "name": "fl-deploy-test",
            "model": {
                "name": "tiny-llama",
                "catalogue": str(repo_root / "configs/models.yaml"),
                "cache_dir": str(model_cache_dir),
            },
            "data": {"max_length": 24, "max_examples": 60},
            "optim": {"learning_rate": 2e-2, "batch_size": 8, "max_steps": 3},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "privacy": {
                "enabled": True,
                "noise_multiplier": 0.8,
                "max_grad_norm": 1.0,
                "delta": 1e-5,
                "max_epsilon": 20,
            },
            "num_clients": 2,
            "num_rounds": 2,
            "min_train_clients": 2,
            "min_available_clients": 2,
            "client_resources": {"torch_threads": 1},
            "round_timeout_s": 120,
        }
    )
    submit_run(operator_home, job, out)
    deadline = time.monotonic() + 240
    while not (out / "summary.json").exists():
        assert link.poll() is None and all(n.poll() is None for n in nodes), link_log.read_text()[-3000:]
        assert time.monotonic() < deadline, link_log.read_text()[-3000:]
        time.sleep(0.5)

    # The node whose key was never admitted is turned away by the SuperLink.
    assert stranger.wait(timeout=30) != 0
    assert "Failed to activate SuperNode" in stranger_log.read_text()
    summary = json.loads((out / "summary.json").read_text())
    first, second = summary["rounds"]
    assert sorted(second["completed"]) == sorted(proven) and not summary["unproven"]
    assert second["eval_loss"] < summary["eval_loss_before"]
    for wallet in proven:  # DP accounting is cumulative on each provider's own node
        assert second["client_epsilon"][wallet] > first["client_epsilon"][wallet] > 0
    rewards = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert sorted((r["round"], r["wallet"]) for r in rewards) == sorted((n, w) for n in (1, 2) for w in proven)
    cap = job.optim.max_steps * job.optim.batch_size
    assert all(0 < r["examples"] <= cap and r["amount_lamports"] == r["examples"] * 1000 for r in rewards)
