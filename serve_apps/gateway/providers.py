"""HTTP routes through which providers outside the Ray cluster register their stage hosts.

    POST /v1/providers/challenge  {wallet, endpoint, cert_pem}           -> challenge fields + the text to sign
    POST /v1/providers/register   {challenge, signature, cert_pem, capabilities, models, region}
                                  -> {provider_id, wallet, endpoint, session_token, link_token, heartbeat_interval_s}
    POST /v1/providers/heartbeat  Authorization: Bearer <session_token>  -> {provider_id, health, last_seen}
    POST /v1/providers/leave      Authorization: Bearer <session_token>  -> {provider_id, health}

The routes reach the registry through `Gateway.providers` (a `ProviderRegistryAPI`), as /v1/network/nodes
reaches it through `Gateway.network_nodes`: tests inject a fake, Serve injects `RegistryProviders` over the
registry actor. Before registering, the gateway completes a TLS handshake with the endpoint trusting only the
submitted certificate (`providers.probe_timeout_s`), so nobody registers an address they do not serve. Every
refusal is OpenAI error JSON: 400 malformed or unreachable, 401 bad/replayed/forged proof or unknown session,
409 conflict (wallet limit, endpoint taken), 429 rate limit or too many pending challenges, 503 no registry.
Nothing here ever answers with another provider's tokens, endpoint or the link-token table (`provider_links`
is for the operator's coordinators, over Ray only), and /v1/network/nodes shows anonymous callers only the
public fields of each record (`public_nodes`).
"""

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from cluster.config.network import NetworkSection
from cluster.network import providers as P
from cluster.network.records import NodeRecord
from cluster.network.wallet import ProofError, ProviderChallenge, TooManyChallenges, parse_wallet
from serve_apps.gateway.errors import OpenAIError

logger = logging.getLogger(__name__)
MAX_PEM_CHARS = P.MAX_CERT_PEM_BYTES


class RegistryUnavailable(LookupError):
    """The registry actor cannot be reached (none running, restarting, timed out)."""


class ProviderRegistryAPI(Protocol):
    """What the routes need from the registry (async; errors as in cluster.network.providers).
    `probe_timeout_s`: how long the register route tries a TLS handshake with the endpoint (0: no probe)."""

    probe_timeout_s: float

    async def challenge(self, wallet: str, endpoint: str, cert_fingerprint: str) -> ProviderChallenge: ...

    async def register(
        self,
        proof_json: dict[str, Any],
        cert_pem: str,
        capabilities: dict[str, Any],
        models: list[str],
        region: str,
        allowed_models: list[str] | None,
    ) -> P.ProviderRegistration: ...

    async def heartbeat(self, session_token: str) -> NodeRecord: ...

    async def leave(self, session_token: str) -> NodeRecord: ...


class ProviderHost(Protocol):
    """The parts of the Gateway the routes use."""

    providers: ProviderRegistryAPI | None
    cards: dict[str, Any]


class ChallengeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wallet: str = Field(min_length=32, max_length=44, description="Base58 wallet address that will sign.")
    endpoint: str = Field(min_length=3, max_length=270, description="host:port of the stage host ([v6]:port).")
    cert_pem: str = Field(min_length=1, max_length=MAX_PEM_CHARS, description="The stage host's TLS certificate.")


class ChallengeFields(BaseModel):
    """The challenge as issued (the `message` the challenge route returned may be echoed; it is ignored:
    the registry rebuilds the text from the fields)."""

    model_config = ConfigDict(extra="forbid")

    nonce: str = Field(min_length=1, max_length=64)
    wallet: str = Field(min_length=32, max_length=44)
    endpoint: str = Field(min_length=3, max_length=270)
    cert_fingerprint: str = Field(min_length=64, max_length=64)
    issued_at: float
    expires_at: float
    message: str | None = Field(default=None, max_length=2_000)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    challenge: ChallengeFields
    signature: str = Field(min_length=1, max_length=100, description="Base58 ed25519 signature of the text.")
    cert_pem: str = Field(min_length=1, max_length=MAX_PEM_CHARS, description="The certificate whose hash is signed.")
    capabilities: P.ProviderCapabilities = Field(default_factory=P.ProviderCapabilities)
    models: list[str] = Field(default_factory=list, max_length=256, description="Served models (catalogue names).")
    region: str = Field(default="", max_length=63)


def session_of(authorization: str | None) -> str:
    """The bearer token of `Authorization` (401 when there is none)."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        raise OpenAIError(401, "send the session token as `Authorization: Bearer <session_token>`", code="no_session")
    return token


def http_error(exc: Exception) -> OpenAIError:
    """The registry's typed refusals as OpenAI errors (the one mapping of this border)."""
    if isinstance(exc, TooManyChallenges):
        return OpenAIError(429, str(exc), code="too_many_challenges", headers={"Retry-After": "10"})
    if isinstance(exc, ProofError):
        return OpenAIError(401, f"registration proof refused: {exc}", code="invalid_proof")
    if isinstance(exc, P.UnknownSession):
        return OpenAIError(401, str(exc), code="invalid_session")
    if isinstance(exc, P.ProviderRequestError):
        return OpenAIError(400, str(exc), code="invalid_value")
    if isinstance(exc, P.ProviderConflict):
        return OpenAIError(409, str(exc), code="conflict")
    if isinstance(exc, LookupError):
        return OpenAIError(503, f"provider registry unavailable: {exc}", code="registry_unavailable")
    raise exc


def build_provider_router(host_of: Callable[[Request], ProviderHost]) -> APIRouter:
    """The provider routes over `host_of(request)` (the app's Gateway)."""
    router = APIRouter(tags=["providers"])

    def registry_of(request: Request) -> tuple[ProviderHost, ProviderRegistryAPI]:
        host = host_of(request)
        if host.providers is None:
            raise OpenAIError(503, "this gateway has no provider registry", code="registry_unavailable")
        return host, host.providers

    @router.post("/v1/providers/challenge")
    async def challenge(body: ChallengeRequest, request: Request) -> dict:
        _, registry = registry_of(request)
        try:
            parse_wallet(body.wallet)
        except ProofError as exc:
            raise OpenAIError(400, str(exc), param="wallet", code="invalid_value") from None
        try:
            host, _ = P.split_endpoint(body.endpoint)
            fingerprint = P.certificate_fingerprint(body.cert_pem, host, time.time())
            issued = await registry.challenge(body.wallet, body.endpoint, fingerprint)
        except Exception as exc:  # noqa: BLE001 - http_error re-raises what it does not map
            raise http_error(exc) from None
        return {"object": "provider.challenge", **P.challenge_json(issued)}

    @router.post("/v1/providers/register")
    async def register(body: RegisterRequest, request: Request) -> dict:
        gateway, registry = registry_of(request)
        proof = {"challenge": body.challenge.model_dump(exclude={"message"}), "signature": body.signature}
        if registry.probe_timeout_s > 0:
            await probe_stage_host(body.challenge.endpoint, body.cert_pem, registry.probe_timeout_s)
        try:
            result = await registry.register(
                proof, body.cert_pem, body.capabilities.model_dump(), body.models, body.region, sorted(gateway.cards)
            )
        except Exception as exc:  # noqa: BLE001
            raise http_error(exc) from None
        record = result.record
        return {
            "object": "provider.registration",
            "provider_id": record.node_id,
            "wallet": record.wallet,
            "endpoint": record.endpoint,
            "models": list(record.models),
            "session_token": result.session_token,
            "link_token": result.link_token,
            "heartbeat_interval_s": result.heartbeat_interval_s,
        }

    async def by_session(call: Callable[[str], Awaitable[NodeRecord]], authorization: str | None) -> NodeRecord:
        """A session-token call to the registry; its refusals as OpenAI errors."""
        try:
            return await call(session_of(authorization))
        except OpenAIError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped by http_error, the one border of these routes
            raise http_error(exc) from None

    @router.post("/v1/providers/heartbeat")
    async def heartbeat(request: Request, authorization: str | None = Header(default=None)) -> dict:
        _, registry = registry_of(request)
        record = await by_session(registry.heartbeat, authorization)
        return {
            "object": "provider.heartbeat",
            "provider_id": record.node_id,
            "health": record.health,
            "last_seen": record.last_seen,
        }

    @router.post("/v1/providers/leave")
    async def leave(request: Request, authorization: str | None = Header(default=None)) -> dict:
        _, registry = registry_of(request)
        record = await by_session(registry.leave, authorization)
        return {"object": "provider.leave", "provider_id": record.node_id, "health": record.health}

    return router


async def probe_stage_host(endpoint: str, cert_pem: str, timeout_s: float) -> None:
    """A TLS handshake with `endpoint` trusting only `cert_pem` (as the coordinator will dial it): proves the
    registrant runs a server there holding that certificate's key. 400 when it fails; one message for every
    failure, so the route tells nothing about what else listens there."""
    try:
        host, port = P.split_endpoint(endpoint)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=cert_pem)
        context.set_alpn_protocols(["h2"])  # what a gRPC client offers
        connect = asyncio.open_connection(host, port, ssl=context, server_hostname=host)
        _, writer = await asyncio.wait_for(connect, timeout_s)
    except (OSError, ssl.SSLError, ValueError, TimeoutError) as exc:
        logger.info("probe of %s failed: %s", endpoint, type(exc).__name__)
        raise OpenAIError(
            400,
            f"no stage host at {endpoint} completed a TLS handshake with the submitted certificate",
            param="challenge.endpoint",
            code="endpoint_unreachable",
        ) from None
    writer.transport.abort()  # no TLS close_notify dance: a gRPC server would keep it waiting for its preface


SECRET_KEYS = frozenset({"link_token", "session_token", "session_sha256"})
# What anyone choosing a provider may see: who (wallet), what (models, kind), where roughly (region), and how
# it does. Node ids, endpoints, certificates, labels (hostnames), hardware and timestamps are the operator's.
PUBLIC_KEYS = (
    "wallet",
    "kind",
    "region",
    "models",
    "health",
    "draining",
    "verified",
    "reputation",
    "requests_served",
    "failures",
    "verifications_passed",
    "verifications_failed",
    "latency_ewma_s",
)


def public_nodes(nodes: Iterable[dict[str, Any]], detail: bool = False) -> list[dict[str, Any]]:
    """Node records for /v1/network/nodes: the public fields only; `detail` (the operator's view, behind the
    operator token) every field but the secrets (records hold none; this is the guard)."""
    if detail:
        return [{k: v for k, v in node.items() if k not in SECRET_KEYS} for node in nodes]
    return [{k: node[k] for k in PUBLIC_KEYS if k in node} for node in nodes]


class RegistryProviders:
    """ProviderRegistryAPI over the registry actor (Ray calls in a thread, each with a timeout; register is
    never retried: its nonce is spent by the first attempt)."""

    def __init__(self, section: NetworkSection, namespace: str) -> None:
        self.section, self.namespace = section, namespace
        self.probe_timeout_s = section.providers.probe_timeout_s

    async def challenge(self, wallet: str, endpoint: str, cert_fingerprint: str) -> ProviderChallenge:
        result: ProviderChallenge = await self._call("issue_provider_challenge", wallet, endpoint, cert_fingerprint)
        return result

    async def register(
        self,
        proof_json: dict[str, Any],
        cert_pem: str,
        capabilities: dict[str, Any],
        models: list[str],
        region: str,
        allowed_models: list[str] | None,
    ) -> P.ProviderRegistration:
        args = (proof_json, cert_pem, capabilities, models, region, allowed_models)
        result: P.ProviderRegistration = await self._call("register_provider", *args, attempts=1)
        return result

    async def heartbeat(self, session_token: str) -> NodeRecord:
        record: NodeRecord = await self._call("provider_heartbeat", session_token)
        return record

    async def leave(self, session_token: str) -> NodeRecord:
        record: NodeRecord = await self._call("provider_leave", session_token)
        return record

    async def _call(self, method: str, *args: Any, attempts: int = 3) -> Any:
        return await asyncio.to_thread(self._call_sync, method, args, attempts)

    def _call_sync(self, method: str, args: tuple[Any, ...], attempts: int) -> Any:
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        from cluster.network.registry import call_registry, get_registry

        try:
            registry = get_registry(self.section, self.namespace)
        except ValueError:
            raise RegistryUnavailable("no provider registry is running (`solanalm node registry`)") from None
        try:
            return call_registry(
                registry, method, *args, timeout_s=self.section.registry_call_timeout_s, attempts=attempts
            )
        except RayTaskError as exc:  # the registry refused: raise its own typed error, not Ray's wrapper
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except (GetTimeoutError, RayActorError) as exc:
            raise RegistryUnavailable(f"{type(exc).__name__}") from exc


__all__ = [
    "ChallengeRequest",
    "ProviderRegistryAPI",
    "RegisterRequest",
    "RegistryProviders",
    "RegistryUnavailable",
    "build_provider_router",
    "http_error",
    "public_nodes",
]
