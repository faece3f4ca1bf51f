"""Providers outside the Ray cluster: what their registration must prove, and the records it makes (pure).

A provider's stage host (`solanalm provider serve`) is a plain OS process on the provider's machine. It
asks the gateway for a challenge binding its wallet, its endpoint (host:port) and the SHA-256 fingerprint
of its self-signed TLS certificate (`wallet.ProviderChallenge`), signs it locally with its Solana keypair
and registers with the certificate PEM. The registry (`registry.NetworkRegistry`) then checks, in order:
the request's shape (capabilities within bounds, model names), the wallet's proof (nonce pending and
unused, fields unaltered, not expired, signature valid for the wallet), that the PEM is the certificate
whose fingerprint was signed and names the endpoint's host, and the per-wallet limit. It answers with two
secrets: a `session_token` (provider -> gateway: heartbeats, leave; only its SHA-256 is kept) and a
`link_token` (operator coordinator -> the provider's stage host; kept, operator domain only). Neither is
part of a `NodeRecord`, so no listing of records can leak them.

Everything here is pure: the registry passes the clock; errors are typed so the HTTP border can map them
(ProofError: 401; ProviderRequestError: 400; ProviderConflict: 409; UnknownSession: 401).
"""

import datetime
import hashlib
import ipaddress
import re
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.config.network import ProvidersSection, ReputationSection
from cluster.network import reputation
from cluster.network.records import Health, NodeCapabilities, NodeRecord
from cluster.network.wallet import ProofError, ProviderChallenge, ProviderProof
from cluster.security.certs import fingerprint

PROVIDER_ID_PREFIX = "provider-"
MAX_CERT_PEM_BYTES = 8 * 1024
MAX_HOST_CHARS = 253
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
REGION = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")  # a Ray/Kubernetes label value
FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")


class ProviderRequestError(ValueError):
    """A registration request is malformed or out of bounds (endpoint, certificate, capabilities, models)."""


class ProviderConflict(ValueError):
    """The registration conflicts with the registry's state (wallet limit reached, endpoint taken)."""


class UnknownSession(LookupError):
    """A session token the registry does not know (never issued, or replaced by a re-registration)."""


class ProviderCapabilities(BaseModel):
    """What a provider claims to offer, bounded (claims steer placement only; pay comes from verified work)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(default=1.0, ge=0, le=4096, description="Logical CPUs offered.")
    num_gpus: float = Field(default=0.0, ge=0, le=64, description="GPUs offered.")
    memory_bytes: int = Field(default=0, ge=0, le=2**46, description="RAM for weights and KV (bytes).")
    gpu_memory_bytes: int = Field(default=0, ge=0, le=2**46, description="GPU memory (bytes).")
    throughput_gflops: float = Field(default=0.0, ge=0, le=1e7, description="Measured dense-matmul GFLOP/s.")
    accelerator: str | None = Field(default=None, max_length=64, description="GPU model, if any.")

    def to_node_capabilities(self) -> NodeCapabilities:
        return NodeCapabilities(**self.model_dump())


@dataclass(frozen=True, slots=True)
class ProviderSecrets:
    """The registry's secrets of one provider record: the session token's SHA-256 and the link token."""

    provider_id: str
    session_sha256: str
    link_token: str

    def to_json(self) -> dict[str, str]:
        return {"provider_id": self.provider_id, "session_sha256": self.session_sha256, "link_token": self.link_token}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ProviderSecrets":
        return cls(str(data["provider_id"]), str(data["session_sha256"]), str(data["link_token"]))


@dataclass(frozen=True, slots=True)
class ProviderRegistration:
    """What a successful registration returns to the provider (the only time the tokens leave the registry
    towards it)."""

    record: NodeRecord
    session_token: str
    link_token: str
    heartbeat_interval_s: float


def provider_id(wallet: str, endpoint: str) -> str:
    """The record key of `wallet`'s stage host at `endpoint`: stable, so re-registering replaces the record."""
    return PROVIDER_ID_PREFIX + hashlib.sha256(f"{wallet}|{endpoint}".encode()).hexdigest()[:16]


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_secrets(pid: str) -> tuple[str, ProviderSecrets]:
    """A fresh session token (returned once) and the secrets the registry keeps for `pid`."""
    session = secrets.token_urlsafe(32)
    return session, ProviderSecrets(pid, token_sha256(session), secrets.token_urlsafe(32))


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[addr]:port`) as (host, port); ProviderRequestError when malformed."""
    if not isinstance(endpoint, str) or len(endpoint) > MAX_HOST_CHARS + 8:
        raise ProviderRequestError("endpoint must be host:port")
    if endpoint.startswith("["):
        host, sep, port = endpoint[1:].partition("]:")
        if not sep:
            raise ProviderRequestError(f"endpoint {endpoint!r}: IPv6 needs the form [addr]:port")
    else:
        host, sep, port = endpoint.rpartition(":")
        if not sep or ":" in host:
            raise ProviderRequestError(f"endpoint {endpoint!r} is not host:port")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProviderRequestError(f"endpoint {endpoint!r}: port must be 1-65535")
    return host, int(port)


def validate_endpoint(endpoint: str, allow_private: bool) -> str:
    """The endpoint, checked: a DNS name or IP address (never unspecified or multicast) and a port; loopback,
    private and link-local addresses only when `allow_private`."""
    host, _ = split_endpoint(endpoint)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None:
        if not HOSTNAME.match(host) or len(host) > MAX_HOST_CHARS:
            raise ProviderRequestError(f"endpoint host {host!r} is not a DNS name or IP address")
        if not allow_private and host.lower() in {"localhost", "localhost.localdomain"}:
            raise ProviderRequestError("loopback endpoints are not accepted by this network")
        return endpoint
    if address.is_unspecified or address.is_multicast:
        raise ProviderRequestError(f"endpoint host {host} is not a reachable unicast address")
    if not allow_private and (address.is_loopback or address.is_private or address.is_link_local):
        raise ProviderRequestError(f"endpoint host {host} is a private address; this network needs public ones")
    return endpoint


def validate_fingerprint(value: str) -> str:
    if not isinstance(value, str) or not FINGERPRINT.match(value):
        raise ProviderRequestError("cert_fingerprint must be 64 lower-case hex digits (SHA-256 of the DER)")
    return value


def certificate_fingerprint(cert_pem: str, host: str, now: float) -> str:
    """SHA-256 fingerprint of `cert_pem` after checking it is one PEM certificate, at most 8 KiB, valid at
    `now` and naming `host` among its subject alternative names (the coordinator dials that name)."""
    if not isinstance(cert_pem, str) or len(cert_pem.encode()) > MAX_CERT_PEM_BYTES:
        raise ProviderRequestError(f"cert_pem must be a PEM certificate of at most {MAX_CERT_PEM_BYTES} bytes")
    if cert_pem.count("-----BEGIN CERTIFICATE-----") != 1:
        raise ProviderRequestError("cert_pem must hold exactly one PEM certificate")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as exc:
        raise ProviderRequestError(f"cert_pem is not a PEM certificate: {exc}") from None
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise ProviderRequestError("the certificate is not valid now (check the provider's clock)")
    if not _names_host(cert, host):
        raise ProviderRequestError(f"the certificate does not name the endpoint host {host}")
    return fingerprint(cert_pem.encode())


def _names_host(cert: x509.Certificate, host: str) -> bool:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host.lower() in {name.lower() for name in names.get_values_for_type(x509.DNSName)}


def parse_capabilities(data: Mapping[str, Any] | None) -> NodeCapabilities:
    try:
        return ProviderCapabilities.model_validate(dict(data or {})).to_node_capabilities()
    except (ValidationError, TypeError, ValueError) as exc:
        raise ProviderRequestError(f"capabilities: {_first_error(exc)}") from None


def validate_models(models: Iterable[str], max_models: int, allowed: Collection[str] | None = None) -> tuple[str, ...]:
    """The advertised model names: well-formed, unique, at most `max_models`, and in `allowed` when given."""
    names = tuple(models)
    if len(names) > max_models:
        raise ProviderRequestError(f"at most {max_models} models may be advertised, got {len(names)}")
    if len(set(names)) != len(names):
        raise ProviderRequestError("models are listed twice")
    for name in names:
        if not isinstance(name, str) or not MODEL_NAME.match(name):
            raise ProviderRequestError(f"model name {name!r} is malformed")
        if allowed is not None and name not in allowed:
            raise ProviderRequestError(f"model {name!r} is not served by this network")
    return names


def validate_region(region: str) -> str:
    if not isinstance(region, str) or not REGION.match(region):
        raise ProviderRequestError("region must be <= 63 of [A-Za-z0-9_.-]")
    return region


def proof_from_json(data: Mapping[str, Any]) -> ProviderProof:
    """A ProviderProof from its JSON form {"challenge": {...fields}, "signature": base58}."""
    try:
        fields = dict(data["challenge"])
        challenge = ProviderChallenge(
            nonce=str(fields.pop("nonce")),
            wallet=str(fields.pop("wallet")),
            endpoint=str(fields.pop("endpoint")),
            cert_fingerprint=str(fields.pop("cert_fingerprint")),
            issued_at=float(fields.pop("issued_at")),
            expires_at=float(fields.pop("expires_at")),
        )
        signature = data["signature"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProviderRequestError(f"proof is malformed ({type(exc).__name__}: {exc})") from None
    if fields:
        raise ProviderRequestError(f"proof.challenge has unknown fields: {', '.join(sorted(fields))}")
    if not isinstance(signature, str) or not 1 <= len(signature) <= 100:
        raise ProviderRequestError("proof.signature must be a base58 string")
    return ProviderProof(challenge=challenge, signature=signature)


def challenge_json(challenge: ProviderChallenge) -> dict[str, Any]:
    """The challenge's fields and the exact text the wallet signs."""
    return {
        "nonce": challenge.nonce,
        "wallet": challenge.wallet,
        "endpoint": challenge.endpoint,
        "cert_fingerprint": challenge.cert_fingerprint,
        "issued_at": challenge.issued_at,
        "expires_at": challenge.expires_at,
        "message": challenge.message().decode(),
    }


def check_proved_certificate(proof: ProviderProof, cert_pem: str, now: float) -> None:
    """The submitted PEM is the certificate whose fingerprint the wallet signed (ProofError otherwise)."""
    host, _ = split_endpoint(proof.challenge.endpoint)
    if certificate_fingerprint(cert_pem, host, now) != proof.challenge.cert_fingerprint:
        raise ProofError("cert_pem is not the certificate whose fingerprint the wallet signed")


def check_limits(pid: str, wallet: str, endpoint: str, records: Iterable[NodeRecord], rule: ProvidersSection) -> None:
    """ProviderConflict when `wallet` already holds its maximum of live registrations, or another live record
    (another wallet's) claims `endpoint`."""
    live = [r for r in records if r.kind == "provider" and r.node_id != pid and r.health != "dead"]
    if any(r.endpoint == endpoint for r in live):
        raise ProviderConflict(f"endpoint {endpoint} is registered by another live provider")
    held = sum(1 for r in live if r.wallet == wallet)
    if held >= rule.max_per_wallet:
        raise ProviderConflict(f"wallet {wallet} already holds {held} live provider registrations (the maximum)")


def provider_record(
    pid: str,
    proof: ProviderProof,
    cert_pem: str,
    capabilities: NodeCapabilities,
    models: Sequence[str],
    region: str,
    now: float,
    previous: NodeRecord | None,
    others: Iterable[NodeRecord],
    rule: ReputationSection,
) -> NodeRecord:
    """The record after a verified registration: a re-registration keeps its counters and reputation (a
    restart must not wash a reputation clean); a new one starts at the wallet's joining reputation."""
    challenge = proof.challenge
    fields: dict[str, Any] = {
        "wallet": challenge.wallet,
        "region": region,
        "capabilities": capabilities,
        "verified": True,
        "health": "alive",
        "draining": False,
        "kind": "provider",
        "endpoint": challenge.endpoint,
        "cert_pem": cert_pem,
        "models": tuple(models),
        "last_seen": now,
    }
    if previous is not None:
        return replace(previous, **fields)
    return NodeRecord(
        node_id=pid,
        joined_at=now,
        reputation=reputation.joining_reputation(challenge.wallet, others, rule),
        **fields,
    )


def heartbeat_health(record: NodeRecord, now: float, ttl_s: float) -> Health:
    """A provider's health from its last heartbeat: dead once it is older than `ttl_s`."""
    if now - record.last_seen > ttl_s:
        return "dead"
    return "draining" if record.draining else "alive"


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg')}"
    return str(exc)
