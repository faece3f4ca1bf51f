"""Reward wallets of federated clients: a keypair per client, and the proof that a client holds it.

At registration the server sends each node a fresh nonce (`RewardWalletChallenge` without a wallet);
the client fills in its wallet and signs the challenge's text with its keypair; the server rebuilds
the text from what it issued plus the claimed wallet and verifies the ed25519 signature. Same scheme as
the provider proofs in `cluster.network.wallet` (its keypair files, address parsing and `ProofError`;
a first line naming the signing domain, so no other proof of this project can be replayed as this one).
A nonce is good for one node of one job, once: the server forgets it after the reply.
"""

import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

from cluster.network.wallet import ProofError, load_keypair, parse_wallet, write_keypair

REWARD_PROOF_DOMAIN = "solanalm-fl-reward-wallet-v1"
KEYPAIR_FILE = "reward-wallet.json"


@dataclass(frozen=True, slots=True)
class RewardWalletChallenge:
    """What a client signs to be paid: `nonce` for `node_id` holding `partition` of `job`, and `wallet`.

    The server issues it with `wallet=""`; the client signs it with its wallet filled in.
    """

    job: str
    node_id: int
    partition: int
    nonce: str
    issued_at: float
    expires_at: float
    wallet: str = ""

    def message(self) -> bytes:
        """The exact bytes the wallet signs."""
        return (
            f"{REWARD_PROOF_DOMAIN}\njob: {self.job}\nstep: registration\nnode: {self.node_id}\n"
            f"partition: {self.partition}\nwallet: {self.wallet}\nnonce: {self.nonce}\n"
            f"issued: {self.issued_at:.3f}\nexpires: {self.expires_at:.3f}"
        ).encode()


def issue_challenge(job: str, node_id: int, partition: int, now: float, ttl_s: float) -> RewardWalletChallenge:
    """A fresh challenge (16 random bytes of nonce) for one node's registration."""
    return RewardWalletChallenge(job, node_id, partition, secrets.token_hex(16), now, now + ttl_s)


def sign_challenge(keypair: Keypair, challenge: RewardWalletChallenge) -> tuple[str, str]:
    """The client side: (wallet, base58 signature) over the challenge with this keypair's wallet."""
    wallet = str(keypair.pubkey())
    return wallet, str(keypair.sign_message(replace(challenge, wallet=wallet).message()))


def verify_claim(issued: RewardWalletChallenge, wallet: str, signature: str | None, now: float) -> Pubkey:
    """The wallet `issued` was signed for (ProofError: no/bad signature, bad address, expired)."""
    if now > issued.expires_at:
        raise ProofError("challenge expired")
    pubkey = parse_wallet(wallet)
    if not signature:
        raise ProofError("no signature")
    try:
        parsed = Signature.from_string(signature)
    except ValueError as exc:
        raise ProofError("signature is not base58 ed25519") from exc
    if not parsed.verify(pubkey, replace(issued, wallet=wallet).message()):
        raise ProofError("signature does not verify for the wallet (forged?)")
    return pubkey


def client_keypair(state_dir: Path) -> Keypair:
    """The client's keypair in `state_dir` (Solana CLI file, mode 0600), generated on first use.

    Creation is atomic (written aside, then linked into place), so two processes of one client that
    start together end up with the same key.
    """
    path = state_dir / KEYPAIR_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        scratch = write_keypair(Keypair(), state_dir / f".{KEYPAIR_FILE}.{secrets.token_hex(4)}")
        try:
            os.link(scratch, path)
        except FileExistsError:
            pass
        finally:
            scratch.unlink()
    return load_keypair(path)
