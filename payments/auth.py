"""Wallet sign-in (Sign-In-With-Solana style messages, ed25519 via solders) and hashed API keys."""

import hashlib
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from solders.pubkey import Pubkey
from solders.signature import Signature
from sqlalchemy import Engine, delete, select, update

from payments.errors import AuthenticationFailed, Forbidden, InvalidRequest, NotFound
from payments.ledger.schema import api_keys, nonces
from payments.protocol import ApiKey, ApiKeyInfo, Challenge, WalletIdentity

KEY_PREFIX = "slm_"
STATEMENT = "Sign in to SolanaLM to use and pay for LLM compute."
_MESSAGE = re.compile(
    r"^(?P<domain>\S+) wants you to sign in with your Solana account:\n"
    r"(?P<address>[1-9A-HJ-NP-Za-km-z]{32,44})\n\n"
    r"(?P<statement>[^\n]*)\n\nURI: (?P<uri>\S+)\nVersion: 1\nNonce: (?P<nonce>[A-Za-z0-9]{8,64})\n"
    r"Issued At: (?P<issued>\S+)\nExpiration Time: (?P<expires>\S+)$"
)


@dataclass(frozen=True, slots=True)
class SiwsMessage:
    domain: str
    address: str
    nonce: str
    issued_at: float
    expires_at: float


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_message(domain: str, address: str, nonce: str, issued_at: float, expires_at: float) -> str:
    """The exact text a wallet signs (SIWS / EIP-4361 layout)."""
    return (
        f"{domain} wants you to sign in with your Solana account:\n{address}\n\n{STATEMENT}\n\n"
        f"URI: https://{domain}\nVersion: 1\nNonce: {nonce}\n"
        f"Issued At: {_iso(issued_at)}\nExpiration Time: {_iso(expires_at)}"
    )


def parse_message(text: str) -> SiwsMessage:
    match = _MESSAGE.match(text)
    if match is None:
        raise AuthenticationFailed("not a SolanaLM sign-in message", code="invalid_message")
    try:
        issued = datetime.fromisoformat(match["issued"].replace("Z", "+00:00")).timestamp()
        expires = datetime.fromisoformat(match["expires"].replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise AuthenticationFailed("bad timestamp in sign-in message", code="invalid_message") from exc
    return SiwsMessage(match["domain"], match["address"], match["nonce"], issued, expires)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class WalletAuth:
    """Nonces (single use, with a TTL, bound to a wallet and the exact message issued) and API keys
    (stored as SHA-256, with an expiry) in the ledger database."""

    def __init__(self, engine: Engine, domain: str, nonce_ttl_s: int, max_age_s: int, api_key_ttl_s: int) -> None:
        self.engine = engine
        self.domain = domain
        self.nonce_ttl_s = nonce_ttl_s
        self.max_age_s = max_age_s
        self.api_key_ttl_s = api_key_ttl_s

    def challenge(self, wallet: str, now: float | None = None) -> Challenge:
        """A fresh nonce and the message the wallet must sign; expired nonces are purged first."""
        _pubkey(wallet)
        now = time.time() if now is None else now
        nonce = secrets.token_hex(16)
        expires = now + self.nonce_ttl_s
        message = format_message(self.domain, wallet, nonce, now, expires)
        with self.engine.begin() as conn:
            # Bounded table: only nonces still valid stay (the auth route's rate limit bounds how many).
            conn.execute(delete(nonces).where(nonces.c.expires_at <= now))
            conn.execute(
                nonces.insert(),
                {"nonce": nonce, "expires_at": expires, "used": 0, "wallet": wallet, "message_hash": _digest(message)},
            )
        return Challenge(message, nonce, expires)

    def verify(self, message: str, signature: str, now: float | None = None, ttl_s: int | None = None) -> ApiKey:
        """Check the signed message and issue an API key bound to its wallet (401 otherwise).

        The message must be byte for byte the one issued to that wallet: statement, URI, domain and
        timestamps cannot be changed. The key lives `api_key_ttl_s`, or `ttl_s` when that is shorter.
        """
        now = time.time() if now is None else now
        parsed = parse_message(message)
        if parsed.domain != self.domain:
            raise AuthenticationFailed(f"message is for domain {parsed.domain}", code="wrong_domain")
        if not parsed.issued_at - 60 <= now < parsed.expires_at:
            raise AuthenticationFailed("sign-in message expired or not yet valid", code="expired_message")
        if parsed.expires_at - parsed.issued_at > self.max_age_s:
            raise AuthenticationFailed("sign-in message validity too long", code="invalid_message")
        try:
            valid = Signature.from_string(signature).verify(_pubkey(parsed.address), message.encode())
        except ValueError as exc:
            raise AuthenticationFailed("malformed signature", code="invalid_signature") from exc
        if not valid:
            raise AuthenticationFailed("signature does not match the wallet", code="invalid_signature")
        lifetime = self.api_key_ttl_s if ttl_s is None else min(ttl_s, self.api_key_ttl_s)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(f"key_{uuid.uuid4().hex[:16]}", parsed.address, secret, now, now + lifetime)
        with self.engine.begin() as conn:
            # Single use, for the wallet and text it was issued with: only the first verify flips `used`.
            claimed = conn.execute(
                update(nonces)
                .where(
                    nonces.c.nonce == parsed.nonce,
                    nonces.c.used == 0,
                    nonces.c.expires_at > now,
                    nonces.c.wallet == parsed.address,
                    nonces.c.message_hash == _digest(message),
                )
                .values(used=1)
            ).rowcount
            if claimed != 1:
                row = conn.execute(select(nonces).where(nonces.c.nonce == parsed.nonce)).first()
                raise _refusal(row, parsed, now)
            conn.execute(
                api_keys.insert(),
                {
                    "id": key.key_id,
                    "wallet": key.wallet,
                    "key_hash": hash_key(secret),
                    "created_at": key.created_at,
                    "expires_at": key.expires_at,
                },
            )
        return key

    def authenticate(self, secret: str, now: float | None = None) -> WalletIdentity:
        if not secret.startswith(KEY_PREFIX):
            raise AuthenticationFailed("invalid API key")
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == hash_key(secret))).first()
        if row is None or row.revoked_at is not None:
            raise AuthenticationFailed("invalid or revoked API key")
        if row.expires_at <= (time.time() if now is None else now):
            raise AuthenticationFailed("API key expired; sign in again for a new one", code="expired_api_key")
        return WalletIdentity(row.wallet, row.id)

    def list_keys(self, wallet: str) -> list[ApiKeyInfo]:
        """`wallet`'s own keys, newest first: ids and times, never a secret or hash."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(api_keys.c.id, api_keys.c.created_at, api_keys.c.expires_at, api_keys.c.revoked_at)
                .where(api_keys.c.wallet == wallet)
                .order_by(api_keys.c.created_at.desc())
            ).all()
        return [ApiKeyInfo(r.id, wallet, r.created_at, r.expires_at, r.revoked_at) for r in rows]

    def revoke(self, key_id: str, wallet: str) -> None:
        """Revoke one of `wallet`'s keys (403 for another wallet's key)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise NotFound(f"no API key {key_id}")
            if row.wallet != wallet:
                raise Forbidden("this API key belongs to another wallet")
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=time.time()))


def _digest(message: str) -> str:
    return hashlib.sha256(message.encode()).hexdigest()


def _refusal(row: Any, parsed: SiwsMessage, now: float) -> AuthenticationFailed:
    """Why a nonce could not be claimed (all 401; the code says which check failed)."""
    if row is None or row.used:
        return AuthenticationFailed("unknown, expired or already used nonce", code="invalid_nonce")
    if row.wallet != parsed.address:
        return AuthenticationFailed("this nonce was issued to another wallet", code="invalid_nonce")
    if row.expires_at <= now:
        return AuthenticationFailed("unknown, expired or already used nonce", code="invalid_nonce")
    return AuthenticationFailed("message differs from the one issued; sign it unchanged", code="invalid_message")


def _pubkey(wallet: str) -> Pubkey:
    try:
        return Pubkey.from_string(wallet)
    except ValueError as exc:
        raise InvalidRequest(f"not a Solana address: {wallet!r}") from exc
