"""A SuperNode's authentication key, bound to the provider wallet that proved itself at registration.

Flower's SuperNode authentication (`flower-superlink --enable-supernode-auth`) admits only nodes whose
EC public key the operator registered (`flwr supernode register`); every Fleet request is signed with
the node's private key. Flower knows nothing of wallets, so the provider signs its node's public key
with its wallet (ed25519, domain `solanalm-fl-node-key-v1`) and hands the operator that binding; the
operator registers the key only when the signature verifies *and* the registry lists the wallet as
proven (`cluster.network`), and keeps Flower's node id -> wallet. The ServerApp then pays a node only
if the wallet it proves for the round is the one its key is bound to.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from solders.keypair import Keypair
from solders.signature import Signature

from cluster.config.network import NetworkSection
from cluster.network.wallet import ProofError, parse_wallet

NODE_KEY_DOMAIN = "solanalm-fl-node-key-v1"
NODE_KEY_FILE = "supernode-auth.key"
NODE_PUBLIC_KEY_FILE = "supernode-auth.pub"


def ensure_node_key(state_dir: Path) -> tuple[Path, Path]:
    """(private, public) OpenSSH files of this machine's SuperNode key (SECP384R1), made on first use."""
    private, public = state_dir / NODE_KEY_FILE, state_dir / NODE_PUBLIC_KEY_FILE
    if not private.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        public.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    return private, public


def _check_public_key(public_key: str) -> None:
    try:
        key = serialization.load_ssh_public_key(public_key.encode())
    except (ValueError, TypeError) as exc:
        raise ProofError("node key is not an OpenSSH public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ProofError("node key is not an EC key (Flower's SuperNode auth needs a NIST curve)")


@dataclass(frozen=True)
class NodeKeyBinding:
    """`wallet` vouches for the SuperNode key `public_key` (OpenSSH text) with an ed25519 `signature`."""

    wallet: str
    public_key: str
    signature: str = ""

    def message(self) -> bytes:
        """The exact bytes the wallet signs (the key by its SHA-256, so the text stays short)."""
        digest = hashlib.sha256(self.public_key.strip().encode()).hexdigest()
        return f"{NODE_KEY_DOMAIN}\nwallet: {self.wallet}\nnode-key-sha256: {digest}".encode()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "NodeKeyBinding":
        try:
            data = json.loads(text)
            return cls(str(data["wallet"]), str(data["public_key"]), str(data["signature"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProofError("node key binding is not {wallet, public_key, signature} JSON") from exc


def bind_node_key(keypair: Keypair, public_key: str) -> NodeKeyBinding:
    """The provider side: its wallet's signature over its SuperNode's public key."""
    unsigned = NodeKeyBinding(str(keypair.pubkey()), public_key.strip())
    return NodeKeyBinding(unsigned.wallet, unsigned.public_key, str(keypair.sign_message(unsigned.message())))


def verify_binding(binding: NodeKeyBinding, is_proven: Callable[[str], bool]) -> str:
    """The wallet of `binding` (ProofError: bad key, bad signature, or a wallet the registry has not proven)."""
    _check_public_key(binding.public_key)
    pubkey = parse_wallet(binding.wallet)
    try:
        signature = Signature.from_string(binding.signature)
    except ValueError as exc:
        raise ProofError("binding signature is not base58 ed25519") from exc
    if not signature.verify(pubkey, binding.message()):
        raise ProofError("binding signature does not verify for the wallet")
    if not is_proven(binding.wallet):
        raise ProofError(f"wallet {binding.wallet} has not proven itself to the registry")
    return binding.wallet


def registry_proven_wallets(network: NetworkSection, namespace: str, timeout_s: float = 30.0) -> set[str]:
    """Wallets of the registry's records (each proved its key at `node join` or provider registration).
    Needs a Ray connection to the operator's cluster."""
    from cluster.network.registry import call_registry, get_registry

    records = call_registry(get_registry(network, namespace), "list_nodes", timeout_s=timeout_s)
    return {record.wallet for record in records if record.wallet}


def read_node_wallets(path: Path) -> dict[int, str]:
    """Flower node id -> bound wallet, as `write_node_wallet` keeps them (empty when the file is absent)."""
    if not path.exists():
        return {}
    return {int(node): str(wallet) for node, wallet in json.loads(path.read_text()).items()}


def write_node_wallet(path: Path, node_id: int, wallet: str) -> None:
    """Record that Flower node `node_id` is bound to `wallet` (atomic replace)."""
    wallets = read_node_wallets(path)
    wallets[node_id] = wallet
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({str(node): w for node, w in sorted(wallets.items())}, indent=2))
    scratch.replace(path)
