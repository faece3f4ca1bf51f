"""The operator's own machine as the network's first provider: a local wallet and the head's registry record.

`solanalm up` (the embedded default) starts the registry and registers the head node with a wallet kept in
the state dir (`local-wallet.json`, the Solana CLI keypair format, 0600, generated on first use), so
`/v1/network/nodes`, `solanalm status` and the TUI show a network from the first minute. The record is the
operator's (`<prefix>/operator=true`): placement leaves it out of the registry's records and keeps planning
the operator's nodes as before (see `cluster.deploy.registry_records`), so how requests are served does not
change. The proof is the same signed challenge a joining node gives, bound to the head's node id.
"""

import logging
from pathlib import Path

from solders.keypair import Keypair

from cluster.config import Settings
from cluster.network.records import NodeCapabilities, NodeRecord
from cluster.network.registry import OPERATOR_LABEL, call_registry, get_or_create_registry
from cluster.network.wallet import load_keypair, sign_challenge, write_keypair

logger = logging.getLogger(__name__)

LOCAL_WALLET_FILE = "local-wallet.json"


def local_wallet_path(state_dir: Path) -> Path:
    return Path(state_dir).expanduser() / LOCAL_WALLET_FILE


def local_wallet(state_dir: Path) -> Keypair:
    """The operator's local wallet: loaded from the state dir, or generated there (0600) on first use."""
    path = local_wallet_path(state_dir)
    if path.exists():
        return load_keypair(path)
    keypair = Keypair()
    write_keypair(keypair, path)
    logger.info("generated the operator's local wallet %s in %s", keypair.pubkey(), path)
    return keypair


def is_operator_record(record: NodeRecord, label_prefix: str) -> bool:
    """True for the operator's own node registered by `register_local_node`."""
    return record.labels.get(f"{label_prefix}/{OPERATOR_LABEL}") == "true"


def register_local_node(settings: Settings, state_dir: Path, throughput_gflops: float) -> NodeRecord:
    """Start the registry if needed and register the head as the operator's node with the local wallet.

    `throughput_gflops` is this machine's measured (or declared) speed; CPU, GPU and memory come from Ray's
    view of the head. Raises what the registry raises (ProofError, Ray's timeouts).
    """
    section = settings.network
    timeout_s = section.registry_call_timeout_s
    registry = get_or_create_registry(section, settings.ray.namespace)
    keypair = local_wallet(state_dir)
    node_id: str = call_registry(registry, "node_id", timeout_s=timeout_s)
    challenge = call_registry(registry, "issue_challenge", node_id, str(keypair.pubkey()), timeout_s=timeout_s)
    capabilities = NodeCapabilities(throughput_gflops=throughput_gflops)
    record: NodeRecord = call_registry(
        registry, "register_operator", sign_challenge(keypair, challenge), capabilities, timeout_s=timeout_s, attempts=1
    )
    return record
