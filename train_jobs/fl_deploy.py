"""Federated rounds across trust domains: Flower's deployment engine (SuperLink + SuperNodes).

The operator runs `flower-superlink` (TLS, `--enable-supernode-auth`) beside its Ray cluster and admits
each provider's SuperNode by registering the node's public key once the provider's wallet binding
verifies (`train_jobs.node_keys`); Flower's node id -> wallet is kept in `node-wallets.json`. A run is
submitted with `flwr run` of the bundle in `train_jobs/flower_app/`; its ServerApp (`serve_run`, in a
process the SuperLink starts on the operator's machine) runs `fl_server.run_server`, the same rounds,
strategy and reward accounting as the simulation. Each provider runs `flower-supernode` on its own
machine (`solanalm provider train`) with its data directory and wallet in the node config; the
ClientApp it starts is `fl_client`'s. Only LoRA updates and metrics cross.

The Flower CLI (`flwr supernode register`, `flwr run`) is driven as a subprocess with its own
`FLWR_HOME`: it is the supported client of the SuperLink's Control API, whose Python side is internal.
"""

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid

from train_jobs.config import FederatedJob
from train_jobs.node_keys import NodeKeyBinding, read_node_wallets, verify_binding, write_node_wallet

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).parent / "flower_app"
NODE_WALLETS_FILE = "node-wallets.json"
CONNECTION = "solanalm"  # the SuperLink connection's name in FLWR_HOME/config.toml
FLOWER_BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr of this environment


class FlowerCommandError(RuntimeError):
    """A Flower CLI call failed (its stderr tail is the message)."""


@dataclass(frozen=True)
class LinkTls:
    """The SuperLink's TLS files (PEM): the CA every SuperNode trusts, the server certificate and key."""

    ca_cert: Path
    cert: Path
    key: Path


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: this venv's binaries first (the SuperLink and SuperNode start
    `flower-superexec` and the app processes by name), its own FLWR_HOME, this project importable."""
    project = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PATH"] = f"{FLOWER_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project, env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def superlink_command(tls: LinkTls, host: str, port: int, database: Path | None = None) -> list[str]:
    """`flower-superlink` with TLS and SuperNode authentication; app dependencies are never installed
    at run time (the bundle uses the environment's own packages)."""
    command = [
        str(FLOWER_BIN / "flower-superlink"),
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.cert),
        "--ssl-keyfile",
        str(tls.key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    return [*command, "--database", str(database)] if database is not None else command


def supernode_command(
    superlink: str,
    ca_cert: Path,
    auth_key: Path,
    data_dir: Path,
    wallet: Path,
    runtime_port: int,
    max_retries: int | None = None,
    torch_threads: int | None = None,
    round_file: Path | None = None,
) -> list[str]:
    """`flower-supernode` dialling `superlink` (host:port) over TLS, signing with `auth_key`; the
    ClientApp finds its data directory and wallet in the node config, and, on a hybrid provider node, its
    cap on torch threads and the file it holds while it trains a round (the node's mode switch waits on it)."""
    node_config = f'data-dir="{data_dir.resolve()}" wallet="{wallet.resolve()}"'
    if torch_threads is not None:
        node_config += f" torch-threads={int(torch_threads)}"
    if round_file is not None:
        node_config += f' round-file="{round_file.resolve()}"'
    command = [
        str(FLOWER_BIN / "flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca_cert),
        "--auth-supernode-private-key",
        str(auth_key),
        "--node-config",
        node_config,
        "--port",
        str(runtime_port),
    ]
    return [*command, "--max-retries", str(max_retries)] if max_retries is not None else command


def write_connection(flwr_home: Path, address: str, ca_cert: Path) -> Path:
    """FLWR_HOME/config.toml naming the operator's SuperLink (what `flwr` commands connect to)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca_cert.resolve()))}\n"
    )
    return path


def _flwr(flwr_home: Path, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
    command = [str(FLOWER_BIN / "flwr"), *args, "--format", "json"]
    try:
        proc = subprocess.run(
            command, env=flower_env(flwr_home), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise FlowerCommandError(f"{' '.join(args[:2])} timed out after {timeout_s} s") from exc
    try:
        answer = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError as exc:
        raise FlowerCommandError(f"flwr {args[0]}: {(proc.stderr or proc.stdout)[-2000:]}") from exc
    if proc.returncode != 0 or not answer.get("success", False):
        raise FlowerCommandError(f"flwr {' '.join(args[:2])}: {answer.get('error-message', answer)}")
    return dict(answer)


def register_node_key(flwr_home: Path, public_key: Path) -> int:
    """Admit a SuperNode key to the SuperLink; Flower's node id for it."""
    return int(_flwr(flwr_home, "supernode", "register", str(public_key), CONNECTION)["node-id"])


def run_config(job: FederatedJob, out_dir: Path, node_wallets: Path) -> dict[str, str]:
    """The bundle's run config for `job`: the job itself, where the ServerApp writes, the key bindings."""
    model = job.model.model_copy(update={"catalogue": job.model.catalogue.resolve()})  # the app's cwd differs
    return {
        "job-json": job.model_copy(update={"model": model}).model_dump_json(),
        "out-dir": str(out_dir.resolve()),
        "node-wallets": str(node_wallets.resolve()),
    }


def submit_run(flwr_home: Path, job: FederatedJob, out_dir: Path, app_dir: Path = APP_DIR) -> int:
    """`flwr run` the bundle against the SuperLink; the run id (the run goes on in the SuperLink). The
    nodes' wallets are the ones admitted into this FLWR_HOME (`flwr_home/node-wallets.json`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = out_dir / "run-config.toml"
    # JSON string escapes are valid TOML basic-string escapes
    config = run_config(job, out_dir, flwr_home / NODE_WALLETS_FILE)
    overrides.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items()))
    return int(_flwr(flwr_home, "run", str(app_dir), CONNECTION, "--run-config", str(overrides))["run-id"])


def admit_node(flwr_home: Path, binding: NodeKeyBinding, is_proven: Callable[[str], bool]) -> tuple[int, str]:
    """Admit a provider's SuperNode: verify its key binding against the proven wallets, register the key
    with the SuperLink, remember node id -> wallet. (node id, wallet); ProofError when the binding fails."""
    wallet = verify_binding(binding, is_proven)
    public_key = flwr_home / "admitted" / f"{wallet}.pub"
    public_key.parent.mkdir(parents=True, exist_ok=True)
    public_key.write_text(binding.public_key + "\n")
    node_id = register_node_key(flwr_home, public_key)
    write_node_wallet(flwr_home / NODE_WALLETS_FILE, node_id, wallet)
    logger.info("admitted SuperNode %d for wallet %s", node_id, wallet)
    return node_id, wallet


def job_of(context: Context) -> FederatedJob:
    """The job a bundle's app runs, from its run config."""
    return FederatedJob.model_validate_json(str(context.run_config["job-json"]))


def serve_run(grid: Grid, context: Context) -> None:
    """The bundle's ServerApp: `fl_server.run_server` with the operator's settings and key bindings."""
    from cluster.config import load_settings
    from train_jobs.fl_server import run_server
    from train_jobs.protocol import make_reward_sink
    from train_jobs.ray_connect import connect

    logging.basicConfig(level=logging.INFO)
    job = job_of(context)
    out_dir = Path(str(context.run_config["out-dir"]))
    node_wallets = read_node_wallets(Path(str(context.run_config["node-wallets"])))
    settings = load_settings()
    if settings.training.reward_sink == "actor":  # payments lives in the operator's Ray cluster
        connect(settings.ray, log_to_driver=False)
    sink = make_reward_sink(settings.training, settings.ray.namespace, jsonl_path=out_dir / "rewards.jsonl")
    run_server(grid, job, sink, settings.training.reward_lamports_per_example, out_dir, node_wallets)
