"""The provider side of registration: prove the wallet to a gateway over HTTP(S), heartbeat, leave.

The keypair never leaves this process: the gateway's challenge is rebuilt here from its fields, checked to
be for this wallet, endpoint and certificate (a gateway cannot get arbitrary text signed), and signed
locally; only the public key (in the challenge) and the signature travel. The session token the gateway
returns authenticates heartbeats and leave; the link token is what the operator's coordinator must present
to this provider's stage host. A heartbeat refused as an unknown session (the registry replaced or lost
it) registers again, and `on_registered` hands the new tokens to the stage host.

A node switching to training `drain()`s: the registry marks it draining (the leave route: no new stages,
the operator re-plans its layers elsewhere) while heartbeats go on, so it stays known and alive; registering
again (`register()`) makes it eligible again. A re-registration forced by a forgotten session while
draining drains again at once.
"""

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from solders.keypair import Keypair

from cluster.network.wallet import ProofError, ProviderChallenge, sign_provider_challenge
from cluster.security.certs import fingerprint

logger = logging.getLogger(__name__)
MAX_CLOCK_SKEW_S = 300.0


class RegistrationError(RuntimeError):
    """The gateway refused or could not be reached; `status` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True, slots=True)
class Registration:
    """What the gateway answered to a successful registration."""

    provider_id: str
    wallet: str
    endpoint: str
    session_token: str
    link_token: str
    heartbeat_interval_s: float


class GatewayClient:
    """The gateway's provider routes over httpx; `ca_cert` pins the CA of an HTTPS gateway's certificate."""

    def __init__(
        self, base_url: str, ca_cert: Path | None = None, timeout_s: float = 10.0, http: httpx.Client | None = None
    ) -> None:
        if base_url.startswith("http://") and not _is_local(base_url):
            logger.warning("gateway %s is plain HTTP: the session token travels unencrypted", base_url)
        if http is None:
            verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
            http = httpx.Client(base_url=base_url.rstrip("/"), verify=verify, timeout=timeout_s)
        self.http = http  # `http`: an httpx.Client of the caller's (a test's in-process app)

    def challenge(self, wallet: str, endpoint: str, cert_pem: str) -> dict[str, Any]:
        return self._post("/v1/providers/challenge", {"wallet": wallet, "endpoint": endpoint, "cert_pem": cert_pem})

    def register(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._post("/v1/providers/register", dict(body))

    def heartbeat(self, session_token: str) -> dict[str, Any]:
        return self._post("/v1/providers/heartbeat", None, session_token)

    def leave(self, session_token: str) -> dict[str, Any]:
        return self._post("/v1/providers/leave", None, session_token)

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any] | None, token: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            response = self.http.post(path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise RegistrationError(f"gateway unreachable ({path}): {exc}") from exc
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if response.status_code != 200:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            message = error.get("message") or response.text[:200]
            raise RegistrationError(
                f"{path}: {response.status_code} {message}", response.status_code, error.get("code")
            )
        if not isinstance(answer, dict):
            raise RegistrationError(f"{path}: the gateway answered no JSON object", response.status_code)
        return answer


def checked_challenge(
    answer: Mapping[str, Any], wallet: str, endpoint: str, cert_fingerprint: str
) -> ProviderChallenge:
    """The gateway's challenge rebuilt from its fields, after checking it binds what this provider asked
    for (ProofError otherwise); the text to sign is derived here, never taken from the gateway."""
    try:
        challenge = ProviderChallenge(
            nonce=str(answer["nonce"]),
            wallet=str(answer["wallet"]),
            endpoint=str(answer["endpoint"]),
            cert_fingerprint=str(answer["cert_fingerprint"]),
            issued_at=float(answer["issued_at"]),
            expires_at=float(answer["expires_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProofError(f"the gateway's challenge is malformed: {exc}") from None
    expected = (wallet, endpoint, cert_fingerprint)
    if (challenge.wallet, challenge.endpoint, challenge.cert_fingerprint) != expected:
        raise ProofError("the gateway's challenge is not for this wallet, endpoint and certificate")
    if not abs(challenge.issued_at - time.time()) < MAX_CLOCK_SKEW_S or challenge.expires_at <= challenge.issued_at:
        raise ProofError("the gateway's challenge has implausible times (clock skew?)")
    if answer.get("message") is not None and answer["message"] != challenge.message().decode():
        raise ProofError("the gateway's challenge text differs from its fields")
    return challenge


def register(
    client: GatewayClient,
    keypair: Keypair,
    endpoint: str,
    cert_pem: str,
    capabilities: Mapping[str, Any],
    models: Sequence[str],
    region: str = "",
) -> Registration:
    """Get a challenge, sign it locally, register; the gateway's answer as a Registration."""
    wallet = str(keypair.pubkey())
    answer = client.challenge(wallet, endpoint, cert_pem)
    challenge = checked_challenge(answer, wallet, endpoint, fingerprint(cert_pem.encode()))
    proof = sign_provider_challenge(keypair, challenge)
    fields = {k: answer[k] for k in ("nonce", "wallet", "endpoint", "cert_fingerprint", "issued_at", "expires_at")}
    body = {
        "challenge": fields,
        "signature": proof.signature,
        "cert_pem": cert_pem,
        "capabilities": dict(capabilities),
        "models": list(models),
        "region": region,
    }
    result = client.register(body)
    try:
        registration = Registration(
            provider_id=str(result["provider_id"]),
            wallet=str(result["wallet"]),
            endpoint=str(result["endpoint"]),
            session_token=str(result["session_token"]),
            link_token=str(result["link_token"]),
            heartbeat_interval_s=float(result["heartbeat_interval_s"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistrationError(f"the gateway's registration answer is malformed: {exc}") from None
    if registration.wallet != wallet or registration.endpoint != endpoint:
        raise RegistrationError("the gateway registered another wallet or endpoint than asked")
    return registration


class ProviderAgent:
    """One provider's registration: register, heartbeat in a background thread, leave.

    `on_registered(registration)` runs after every (re-)registration, before heartbeats use it: the stage
    host takes the link token from there."""

    def __init__(
        self,
        client: GatewayClient,
        keypair: Keypair,
        endpoint: str,
        cert_pem: str,
        capabilities: Mapping[str, Any],
        models: Sequence[str],
        region: str = "",
        on_registered: Callable[[Registration], None] | None = None,
    ) -> None:
        self.client, self.keypair = client, keypair
        self.endpoint, self.cert_pem = endpoint, cert_pem
        self.capabilities, self.models, self.region = dict(capabilities), list(models), region
        self.on_registered = on_registered
        self.registration: Registration | None = None
        self.heartbeats_ok = 0
        self.draining = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, attempts: int = 5, backoff_s: float = 1.0) -> Registration:
        """Register (a fresh challenge each attempt); a gateway that is unreachable, rate-limits (429) or has no
        registry yet (5xx) is retried with doubling backoff, a refusal (other 4xx) is raised at once. (A plain
        loop: the project carries no retry library.)"""
        for attempt in range(1, attempts + 1):
            try:
                registration = register(
                    self.client, self.keypair, self.endpoint, self.cert_pem, self.capabilities, self.models, self.region
                )
                break
            except RegistrationError as exc:
                transient = exc.status is None or exc.status == 429 or exc.status >= 500
                if not transient or attempt == attempts:
                    raise
                delay = backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "registration attempt %d/%d failed (%s); retrying in %.0f s", attempt, attempts, exc, delay
                )
                if self._stop.wait(delay):
                    raise
        if self.on_registered is not None:
            self.on_registered(registration)
        self.registration = registration
        self.draining = False
        logger.info("registered %s at %s for wallet %s", registration.provider_id, self.endpoint, registration.wallet)
        return registration

    def start_heartbeats(self) -> None:
        if self.registration is None:
            raise RuntimeError("register first")
        self._thread = threading.Thread(target=self._beat, name="provider-heartbeat", daemon=True)
        self._thread.start()

    def heartbeat_once(self) -> None:
        """One heartbeat; an unknown session (401) registers again."""
        if self.registration is None:
            raise RuntimeError("register first")
        try:
            self.client.heartbeat(self.registration.session_token)
            self.heartbeats_ok += 1
        except RegistrationError as exc:
            if exc.status != 401:
                raise
            logger.warning("the gateway forgot this session (%s); registering again", exc)
            draining = self.draining
            self.register()
            if draining:
                self.drain()

    def drain(self) -> None:
        """Tell the registry this node takes no new stages (it stays registered and heartbeating)."""
        if self.registration is None:
            raise RuntimeError("register first")
        self.client.leave(self.registration.session_token)
        self.draining = True
        logger.info("%s is draining", self.registration.provider_id)

    def leave(self) -> None:
        """Stop heartbeating and tell the gateway this provider leaves (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.registration is not None:
            try:
                self.client.leave(self.registration.session_token)
            except RegistrationError as exc:
                logger.warning("leave not acknowledged: %s", exc)

    def _beat(self) -> None:
        assert self.registration is not None  # start_heartbeats checked
        while not self._stop.wait(self.registration.heartbeat_interval_s):
            try:
                self.heartbeat_once()
            except (RegistrationError, ProofError) as exc:  # transient: the next beat retries
                logger.warning("heartbeat failed: %s", exc)


def _is_local(url: str) -> bool:
    host = httpx.URL(url).host
    return host in {"127.0.0.1", "::1", "localhost"}
