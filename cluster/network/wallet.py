"""Wallet proofs: the registry issues a challenge, the provider signs it with its Solana key.

Two challenges, each with its own signing domain (the first line of the signed text), so a proof of one
kind can never be replayed as the other:
- `Challenge` (`solanalm-node-join-v1`) binds a one-time nonce to one Ray node id and one wallet;
- `ProviderChallenge` (`solanalm-provider-register-v1`) binds it to one wallet, the stage host's endpoint
  (host:port) and the SHA-256 fingerprint of its TLS certificate, for providers outside the Ray cluster.
Both expire. The signed message is a fixed, human-readable text (what a hardware wallet would show).
Replay protection needs no persisted "used" set: a nonce is valid only while it is pending in the
`ChallengeBook` that issued it, and it is consumed by its first verification attempt.
"""

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature

PROOF_DOMAIN = "solanalm-node-join-v1"
PROVIDER_PROOF_DOMAIN = "solanalm-provider-register-v1"


class ProofError(ValueError):
    """A join proof was rejected; the message says why (unknown/replayed, expired, forged, mismatched)."""


class TooManyChallenges(ProofError):
    """The book holds its maximum of pending challenges (retry once some expire)."""


class Signable(Protocol):
    """What a ChallengeBook keeps: a one-time nonce for a wallet, an expiry, and the text to sign."""

    @property
    def nonce(self) -> str: ...

    @property
    def wallet(self) -> str: ...

    @property
    def expires_at(self) -> float: ...

    def message(self) -> bytes: ...


_C = TypeVar("_C", bound=Signable)


@dataclass(frozen=True, slots=True)
class Challenge:
    """What the registry asks a provider to sign: `nonce` for `node_id` and `wallet`, valid until `expires_at`."""

    nonce: str
    node_id: str
    wallet: str
    issued_at: float
    expires_at: float

    def message(self) -> bytes:
        """The exact bytes the wallet signs."""
        return (
            f"{PROOF_DOMAIN}\nnode: {self.node_id}\nwallet: {self.wallet}\nnonce: {self.nonce}\n"
            f"issued: {self.issued_at:.3f}\nexpires: {self.expires_at:.3f}"
        ).encode()


@dataclass(frozen=True, slots=True)
class ProviderChallenge:
    """What the registry asks an out-of-cluster provider to sign: `nonce` for `wallet`, whose stage host
    listens at `endpoint` (host:port) with the TLS certificate of SHA-256 `cert_fingerprint` (hex)."""

    nonce: str
    wallet: str
    endpoint: str
    cert_fingerprint: str
    issued_at: float
    expires_at: float

    def message(self) -> bytes:
        """The exact bytes the wallet signs."""
        return (
            f"{PROVIDER_PROOF_DOMAIN}\nwallet: {self.wallet}\nendpoint: {self.endpoint}\n"
            f"cert-sha256: {self.cert_fingerprint}\nnonce: {self.nonce}\n"
            f"issued: {self.issued_at:.3f}\nexpires: {self.expires_at:.3f}"
        ).encode()


@dataclass(frozen=True, slots=True)
class JoinProof:
    """A challenge and the wallet's ed25519 signature over `challenge.message()` (base58)."""

    challenge: Challenge
    signature: str


@dataclass(frozen=True, slots=True)
class ProviderProof:
    """A provider challenge and the wallet's ed25519 signature over `challenge.message()` (base58)."""

    challenge: ProviderChallenge
    signature: str


def sign_challenge(keypair: Keypair, challenge: Challenge) -> JoinProof:
    """The provider side: sign the challenge with the wallet's keypair."""
    return JoinProof(challenge=challenge, signature=_sign(keypair, challenge))


def sign_provider_challenge(keypair: Keypair, challenge: ProviderChallenge) -> ProviderProof:
    """The provider side of registration: sign the (locally rebuilt) challenge with the wallet's keypair."""
    return ProviderProof(challenge=challenge, signature=_sign(keypair, challenge))


def _sign(keypair: Keypair, challenge: Signable) -> str:
    if str(keypair.pubkey()) != challenge.wallet:
        raise ProofError(f"challenge is for wallet {challenge.wallet}, keypair is {keypair.pubkey()}")
    return str(keypair.sign_message(challenge.message()))


def parse_wallet(wallet: str) -> Pubkey:
    """A base58 wallet address as a Pubkey (ProofError when malformed)."""
    try:
        return Pubkey.from_string(wallet)
    except ValueError as exc:
        raise ProofError(f"not a wallet address: {wallet!r}") from exc


@dataclass(slots=True)
class ChallengeBook:
    """The registry side: pending challenges, issued and verified (pure: the caller passes the clock).
    `max_pending` bounds the memory an unauthenticated caller can make it hold (None: unbounded)."""

    ttl_s: float
    max_pending: int | None = None
    pending: dict[str, Signable] = field(default_factory=dict)

    def issue(self, node_id: str, wallet: str, now: float) -> Challenge:
        """A fresh challenge for `node_id` owned by `wallet`."""
        parse_wallet(wallet)
        if not node_id:
            raise ProofError("node_id is empty")
        challenge = Challenge(
            nonce=secrets.token_hex(16), node_id=node_id, wallet=wallet, issued_at=now, expires_at=now + self.ttl_s
        )
        return self._add(challenge, now)

    def issue_provider(self, wallet: str, endpoint: str, cert_fingerprint: str, now: float) -> ProviderChallenge:
        """A fresh registration challenge for `wallet`'s stage host at `endpoint` with that certificate
        (the caller validates endpoint and fingerprint syntax)."""
        parse_wallet(wallet)
        challenge = ProviderChallenge(
            nonce=secrets.token_hex(16),
            wallet=wallet,
            endpoint=endpoint,
            cert_fingerprint=cert_fingerprint,
            issued_at=now,
            expires_at=now + self.ttl_s,
        )
        return self._add(challenge, now)

    def verify(self, proof: JoinProof | ProviderProof, now: float) -> Pubkey:
        """The proving wallet; consumes the nonce (a second use is a replay). ProofError when rejected."""
        issued = self.pending.pop(proof.challenge.nonce, None)
        if issued is None:
            raise ProofError("unknown or already used challenge (replay?)")
        if issued != proof.challenge:
            raise ProofError("challenge was altered (its fields differ from the issued one)")
        if now > issued.expires_at:
            raise ProofError("challenge expired")
        pubkey = parse_wallet(issued.wallet)
        try:
            signature = Signature.from_string(proof.signature)
        except ValueError as exc:
            raise ProofError("signature is not base58 ed25519") from exc
        if not signature.verify(pubkey, issued.message()):
            raise ProofError("signature does not verify for the wallet (forged?)")
        return pubkey

    def _add(self, challenge: _C, now: float) -> _C:
        self._forget_expired(now)
        if self.max_pending is not None and len(self.pending) >= self.max_pending:
            raise TooManyChallenges(f"{len(self.pending)} challenges are pending; retry in a while")
        self.pending[challenge.nonce] = challenge
        return challenge

    def _forget_expired(self, now: float) -> None:
        for nonce in [n for n, c in self.pending.items() if now > c.expires_at]:
            del self.pending[nonce]


def load_keypair(path: Path) -> Keypair:
    """A keypair file in the Solana CLI format (JSON array of 64 bytes: secret key then public key)."""
    try:
        raw = json.loads(Path(path).expanduser().read_text())
        if not isinstance(raw, list) or len(raw) != 64:
            raise ValueError("expected a JSON array of 64 integers")
        return Keypair.from_bytes(bytes(raw))
    except (OSError, ValueError) as exc:
        raise ProofError(f"{path}: not a Solana keypair file ({exc})") from exc


def write_keypair(keypair: Keypair, path: Path) -> Path:
    """Write `keypair` in the Solana CLI format, readable by its owner only."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(list(bytes(keypair)), handle)
    return path
