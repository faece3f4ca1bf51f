"""`solanalm provider train`: a provider's SuperNode on its own machine, with its own data directory.

Mounted into `solanalm provider` through the `solanalm.provider_commands` entry points (the stage
host's CLI loads them), so `serve_apps` does not import this package.
"""

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cluster.network.wallet import ProofError, load_keypair
from train_jobs.fl_deploy import flower_env, supernode_command
from train_jobs.node_keys import bind_node_key, ensure_node_key

console = Console(stderr=True)
DEFAULT_STATE_DIR = Path("~/.local/state/solanalm/fl-node")
BINDING_FILE = "node-binding.json"
ROUND_FILE = "round-in-progress"  # serve_apps.stagehost.node_sides.ROUND_FILE


def train_command(
    superlink: Annotated[str, typer.Option(help="The operator's SuperLink, host:port (TLS).")],
    wallet: Annotated[Path, typer.Option(help="Solana CLI keypair file the registry knows as proven.")],
    data: Annotated[Path, typer.Option(help="Local training data: *.jsonl / *.txt files; never leaves here.")],
    ca_cert: Annotated[Path, typer.Option(help="CA certificate that signs the SuperLink's TLS certificate.")],
    state_dir: Annotated[Path, typer.Option(help="Where the SuperNode key and its binding live.")] = DEFAULT_STATE_DIR,
    runtime_port: Annotated[int, typer.Option(min=1, max=65535, help="Local port of the node's runtime API.")] = 9094,
    bind_only: Annotated[bool, typer.Option(help="Write and print the key binding, do not start the node.")] = False,
    torch_threads: Annotated[
        int | None, typer.Option(min=1, help="Cap on the ClientApp's torch threads (a hybrid node's training share).")
    ] = None,
) -> None:
    """Bind this machine's SuperNode key to WALLET (the operator admits it) and run the SuperNode."""
    state = state_dir.expanduser()
    try:
        keypair = load_keypair(wallet.expanduser())
    except (ProofError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]wallet:[/] {exc}")
        raise typer.Exit(1) from exc
    if not data.expanduser().is_dir():
        console.print(f"[red]--data {data} is not a directory[/]")
        raise typer.Exit(1)
    private, public = ensure_node_key(state)
    binding = bind_node_key(keypair, public.read_text())
    (state / BINDING_FILE).write_text(binding.to_json())
    print(binding.to_json())  # stdout: what the operator passes to `solanalm train fl-admit`
    console.print(f"key binding in {state / BINDING_FILE}: the operator admits it with `solanalm train fl-admit`")
    if bind_only:
        return
    command = supernode_command(
        superlink,
        ca_cert.expanduser(),
        private,
        data.expanduser(),
        wallet.expanduser(),
        runtime_port,
        torch_threads=torch_threads,
        round_file=state / ROUND_FILE,  # held while a round trains: `provider mode` waits for it
    )
    proc = subprocess.Popen(command, env=flower_env(state / "flwr"))
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait(timeout=30)
    if code != 0:
        console.print(f"[red]SuperNode exited with {code}[/] (not admitted yet, or the SuperLink is unreachable)")
    sys.exit(code)
