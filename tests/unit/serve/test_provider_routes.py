"""The provider routes over a registry faked behind Gateway.providers: each attack is a 4xx OpenAI error."""

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from solders.keypair import Keypair

from cluster.config.network import NetworkSection, ProvidersSection
from cluster.config.rate_limits import RateLimit, RateLimitsSection
from cluster.network.providers import ProviderRegistration
from cluster.network.records import NodeRecord
from cluster.network.registry import NetworkRegistry
from cluster.network.wallet import ProofError, ProviderChallenge
from cluster.security.certs import CertKey, self_signed
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.limits import RequestLimiter
from serve_apps.gateway.providers import RegistryUnavailable
from serve_apps.stagehost.registration import (
    GatewayClient,
    ProviderAgent,
    Registration,
    RegistrationError,
    checked_challenge,
    register,
)

ENDPOINT = "127.0.0.1:7443"


class NoBackend:
    def models(self) -> list[str]:
        return []


class InProcessProviders:
    """The ProviderRegistryAPI over a pure NetworkRegistry (what the actor runs), with a settable clock."""

    def __init__(self, registry: NetworkRegistry, probe_timeout_s: float = 0.0) -> None:
        self.registry, self.offset_s, self.probe_timeout_s = registry, 0.0, probe_timeout_s

    def now(self) -> float:
        return time.time() + self.offset_s

    async def challenge(self, wallet: str, endpoint: str, cert_fingerprint: str) -> ProviderChallenge:
        return self.registry.issue_provider_challenge(wallet, endpoint, cert_fingerprint, self.now())

    async def register(
        self,
        proof_json: dict[str, Any],
        cert_pem: str,
        capabilities: dict[str, Any],
        models: list[str],
        region: str,
        allowed_models: list[str] | None,
    ) -> ProviderRegistration:
        return self.registry.register_provider(
            proof_json, cert_pem, capabilities, models, self.now(), region, allowed_models
        )

    async def heartbeat(self, session_token: str) -> NodeRecord:
        return self.registry.provider_heartbeat(session_token, self.now())

    async def leave(self, session_token: str) -> NodeRecord:
        return self.registry.provider_leave(session_token)


class DownProviders(InProcessProviders):
    async def challenge(self, wallet: str, endpoint: str, cert_fingerprint: str) -> ProviderChallenge:
        raise RegistryUnavailable("GetTimeoutError")

    async def heartbeat(self, session_token: str) -> NodeRecord:
        raise RegistryUnavailable("GetTimeoutError")


@pytest.fixture(scope="module")
def cert() -> CertKey:
    return self_signed(["127.0.0.1"])


@pytest.fixture()
def registry() -> NetworkRegistry:
    return NetworkRegistry(NetworkSection(providers=ProvidersSection(max_per_wallet=2, max_pending_challenges=50)))


@pytest.fixture()
def fake(registry: NetworkRegistry) -> InProcessProviders:
    return InProcessProviders(registry)


def app_with(providers: Any, registry: NetworkRegistry | None = None) -> TestClient:
    async def nodes() -> list[dict[str, Any]]:
        return [r.to_json() for r in registry.list_nodes()] if registry else []

    gateway = Gateway(NoBackend(), [ModelCard("tiny-llama", "tests")], network_nodes=nodes, providers=providers)  # type: ignore[arg-type]
    gateway.operator_token = SecretStr(OPERATOR_TOKEN)
    return TestClient(create_gateway_app(gateway, max_body_bytes=64_000))


OPERATOR_TOKEN = "operator-token-for-tests"
AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


@pytest.fixture()
def http(fake: InProcessProviders, registry: NetworkRegistry) -> TestClient:
    return app_with(fake, registry)


def assert_error(response: Any, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def get_challenge(http: TestClient, keypair: Keypair, cert: CertKey, endpoint: str = ENDPOINT) -> dict:
    body = {"wallet": str(keypair.pubkey()), "endpoint": endpoint, "cert_pem": cert.cert_pem.decode()}
    response = http.post("/v1/providers/challenge", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def fields_of(challenge: dict) -> ProviderChallenge:
    names = ("nonce", "wallet", "endpoint", "cert_fingerprint", "issued_at", "expires_at")
    return ProviderChallenge(**{name: challenge[name] for name in names})


def register_body(challenge: dict, keypair: Keypair, cert: CertKey, **extra: Any) -> dict:
    signature = str(keypair.sign_message(fields_of(challenge).message()))
    fields = {k: v for k, v in challenge.items() if k != "object"}
    body = {"challenge": fields, "signature": signature, "cert_pem": cert.cert_pem.decode(), "models": ["tiny-llama"]}
    body["capabilities"] = {"num_cpus": 2, "memory_bytes": 2**32, "throughput_gflops": 5.0}
    return {**body, **extra}


def registered(http: TestClient, keypair: Keypair, cert: CertKey, endpoint: str = ENDPOINT) -> dict:
    response = http.post(
        "/v1/providers/register", json=register_body(get_challenge(http, keypair, cert, endpoint), keypair, cert)
    )
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_register_heartbeat_leave(http: TestClient, cert: CertKey) -> None:
    keypair = Keypair()
    challenge = get_challenge(http, keypair, cert)
    assert challenge["message"] == fields_of(challenge).message().decode()
    assert challenge["message"].startswith("solanalm-provider-register-v1\n")
    assert challenge["cert_fingerprint"] == cert.fingerprint
    body = http.post("/v1/providers/register", json=register_body(challenge, keypair, cert, region="eu")).json()
    assert body["provider_id"].startswith("provider-") and body["wallet"] == str(keypair.pubkey())
    assert body["endpoint"] == ENDPOINT and body["models"] == ["tiny-llama"]
    assert body["session_token"] and body["link_token"] and body["heartbeat_interval_s"] > 0
    beat = http.post("/v1/providers/heartbeat", headers=bearer(body["session_token"]))
    assert beat.status_code == 200 and beat.json()["health"] == "alive"
    left = http.post("/v1/providers/leave", headers=bearer(body["session_token"]))
    assert left.status_code == 200 and left.json()["health"] == "draining"


def test_network_nodes_never_show_tokens(http: TestClient, cert: CertKey) -> None:
    body = registered(http, Keypair(), cert)
    for headers in ({}, AS_OPERATOR):  # the public list, and the operator's detail
        text = http.get("/v1/network/nodes?detail=1" if headers else "/v1/network/nodes", headers=headers).text
        assert body["link_token"] not in text and body["session_token"] not in text
        assert "link_token" not in text and "session" not in text
    public = http.get("/v1/network/nodes").json()["data"]
    assert [(n["kind"], n["wallet"]) for n in public] == [("provider", body["wallet"])] and "node_id" not in public[0]
    nodes = http.get("/v1/network/nodes?detail=1", headers=AS_OPERATOR).json()["data"]
    assert nodes[0]["node_id"] == body["provider_id"] and nodes[0]["endpoint"] == ENDPOINT


def test_a_leaky_nodes_source_is_still_filtered() -> None:
    async def nodes() -> list[dict[str, Any]]:
        return [{"node_id": "provider-x", "link_token": "secret", "session_sha256": "h", "session_token": "t"}]

    gateway = Gateway(NoBackend(), [], network_nodes=nodes, operator_token=SecretStr(OPERATOR_TOKEN))  # type: ignore[arg-type]
    data = TestClient(create_gateway_app(gateway)).get("/v1/network/nodes?detail=1", headers=AS_OPERATOR).json()
    assert data["data"] == [{"node_id": "provider-x"}]


def test_forged_signature_is_401(http: TestClient, cert: CertKey) -> None:
    keypair = Keypair()
    body = register_body(get_challenge(http, keypair, cert), Keypair(), cert)  # signed by another key
    assert_error(http.post("/v1/providers/register", json=body), 401, "invalid_proof")


def test_replayed_registration_is_401(http: TestClient, cert: CertKey) -> None:
    keypair = Keypair()
    body = register_body(get_challenge(http, keypair, cert), keypair, cert)
    assert http.post("/v1/providers/register", json=body).status_code == 200
    error = assert_error(http.post("/v1/providers/register", json=body), 401, "invalid_proof")
    assert "already used" in error["message"]


@pytest.mark.parametrize(("field", "value"), [("endpoint", "127.0.0.1:9999"), ("cert_fingerprint", "ab" * 32)])
def test_altered_challenge_is_401(http: TestClient, cert: CertKey, field: str, value: str) -> None:
    keypair = Keypair()
    challenge = get_challenge(http, keypair, cert)
    altered = {**challenge, field: value}
    signature = str(keypair.sign_message(replace(fields_of(challenge), **{field: value}).message()))
    body = {**register_body(altered, keypair, cert), "signature": signature}
    assert_error(http.post("/v1/providers/register", json=body), 401, "invalid_proof")


def test_wrong_certificate_is_401(http: TestClient, cert: CertKey) -> None:
    keypair = Keypair()
    body = register_body(get_challenge(http, keypair, cert), keypair, cert)
    body["cert_pem"] = self_signed(["127.0.0.1"]).cert_pem.decode()
    assert_error(http.post("/v1/providers/register", json=body), 401, "invalid_proof")


def test_expired_challenge_is_401(http: TestClient, fake: InProcessProviders, cert: CertKey) -> None:
    keypair = Keypair()
    body = register_body(get_challenge(http, keypair, cert), keypair, cert)
    fake.offset_s = ProvidersSection().challenge_ttl_s + 5
    assert "expired" in assert_error(http.post("/v1/providers/register", json=body), 401)["message"]


def test_wallet_b_signing_wallet_a_challenge_is_401(http: TestClient, cert: CertKey) -> None:
    a, b = Keypair(), Keypair()
    challenge = get_challenge(http, a, cert)
    as_b = {**challenge, "wallet": str(b.pubkey())}
    body = register_body(as_b, b, cert)
    assert "altered" in assert_error(http.post("/v1/providers/register", json=body), 401)["message"]


@pytest.mark.parametrize(
    "change",
    [
        {"models": ["not-served"]},
        {"capabilities": {"num_cpus": -1}},
        {"capabilities": {"memory_bytes": 2**60}},
        {"capabilities": {"cores": 2}},
        {"region": "x" * 64},
        {"surprise": 1},
        {"signature": "x" * 101},
        {"cert_pem": "x" * 9000},
    ],
)
def test_malformed_registration_is_400(http: TestClient, cert: CertKey, change: dict) -> None:
    keypair = Keypair()
    body = {**register_body(get_challenge(http, keypair, cert), keypair, cert), **change}
    assert_error(http.post("/v1/providers/register", json=body), 400)


@pytest.mark.parametrize(
    "change",
    [
        {"cert_pem": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"},
        {"cert_pem": "x" * 8193},
        {"endpoint": "127.0.0.1"},
        {"endpoint": "0.0.0.0:443"},
        {"wallet": "short"},
        {"wallet": "1" * 44},
        {"extra": True},
    ],
)
def test_malformed_challenge_request_is_400(http: TestClient, cert: CertKey, change: dict) -> None:
    body = {"wallet": str(Keypair().pubkey()), "endpoint": ENDPOINT, "cert_pem": cert.cert_pem.decode(), **change}
    assert_error(http.post("/v1/providers/challenge", json=body), 400)


def test_certificate_for_another_host_gets_no_challenge(http: TestClient) -> None:
    other = self_signed(["10.9.9.9"])
    body = {"wallet": str(Keypair().pubkey()), "endpoint": ENDPOINT, "cert_pem": other.cert_pem.decode()}
    assert "does not name" in assert_error(http.post("/v1/providers/challenge", json=body), 400)["message"]


def test_malformed_json_is_400(http: TestClient) -> None:
    response = http.post("/v1/providers/register", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


def test_wallet_limit_is_409(http: TestClient, cert: CertKey) -> None:
    keypair = Keypair()
    registered(http, keypair, cert, "127.0.0.1:1001")
    registered(http, keypair, cert, "127.0.0.1:1002")
    body = register_body(get_challenge(http, keypair, cert, "127.0.0.1:1003"), keypair, cert)
    assert_error(http.post("/v1/providers/register", json=body), 409, "conflict")


def test_endpoint_of_another_live_provider_is_409(http: TestClient, cert: CertKey) -> None:
    registered(http, Keypair(), cert)
    intruder = Keypair()
    body = register_body(get_challenge(http, intruder, cert), intruder, cert)
    assert_error(http.post("/v1/providers/register", json=body), 409, "conflict")


def test_too_many_pending_challenges_is_429(http: TestClient, cert: CertKey) -> None:
    body = {"wallet": str(Keypair().pubkey()), "endpoint": ENDPOINT, "cert_pem": cert.cert_pem.decode()}
    for _ in range(50):
        assert http.post("/v1/providers/challenge", json=body).status_code == 200
    response = http.post("/v1/providers/challenge", json=body)
    assert_error(response, 429, "too_many_challenges")
    assert response.headers["Retry-After"]


def test_rate_limited_client_is_429(fake: InProcessProviders, cert: CertKey) -> None:
    auth_once = RateLimitsSection.unlimited().model_copy(update={"auth": RateLimit(requests=1)})
    gateway = Gateway(NoBackend(), [], limiter=RequestLimiter(auth_once), providers=fake)  # type: ignore[arg-type]
    http = TestClient(create_gateway_app(gateway))
    body = {"wallet": str(Keypair().pubkey()), "endpoint": ENDPOINT, "cert_pem": cert.cert_pem.decode()}
    assert http.post("/v1/providers/challenge", json=body).status_code == 200
    assert_error(http.post("/v1/providers/challenge", json=body), 429, "rate_limit_exceeded")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}, bearer("nope")])
def test_heartbeat_and_leave_without_a_valid_session_are_401(http: TestClient, headers: dict) -> None:
    assert_error(http.post("/v1/providers/heartbeat", headers=headers), 401)
    assert_error(http.post("/v1/providers/leave", headers=headers), 401)


def test_old_session_after_reregistering_is_401(http: TestClient, cert: CertKey) -> None:
    keypair = Keypair()
    first = registered(http, keypair, cert)
    second = registered(http, keypair, cert)
    assert second["provider_id"] == first["provider_id"] and second["link_token"] != first["link_token"]
    assert_error(http.post("/v1/providers/heartbeat", headers=bearer(first["session_token"])), 401, "invalid_session")
    assert http.post("/v1/providers/heartbeat", headers=bearer(second["session_token"])).status_code == 200


def test_no_registry_is_503(cert: CertKey) -> None:
    http = app_with(None)
    body = {"wallet": str(Keypair().pubkey()), "endpoint": ENDPOINT, "cert_pem": cert.cert_pem.decode()}
    assert_error(http.post("/v1/providers/challenge", json=body), 503, "registry_unavailable")
    assert_error(http.post("/v1/providers/heartbeat", headers=bearer("x")), 503, "registry_unavailable")


def test_unreachable_registry_is_503(registry: NetworkRegistry, cert: CertKey) -> None:
    http = app_with(DownProviders(registry))
    body = {"wallet": str(Keypair().pubkey()), "endpoint": ENDPOINT, "cert_pem": cert.cert_pem.decode()}
    assert_error(http.post("/v1/providers/challenge", json=body), 503, "registry_unavailable")
    assert_error(http.post("/v1/providers/heartbeat", headers=bearer("x")), 503, "registry_unavailable")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
REGISTER_FIELDS = ["challenge", "signature", "cert_pem", "capabilities", "models", "region"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(st.sampled_from(REGISTER_FIELDS), JSON, max_size=6),
    route=st.sampled_from(["challenge", "register"]),
)
def test_fuzzed_bodies_are_never_5xx(http: TestClient, body: dict, route: str) -> None:
    response = http.post(
        f"/v1/providers/{route}", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text


# -- the provider's client (serve_apps/stagehost/registration.py) against the in-process gateway -------------


def agent_for(http: TestClient, keypair: Keypair, cert: CertKey, seen: list[Registration]) -> ProviderAgent:
    client = GatewayClient("http://testserver", http=http)
    return ProviderAgent(
        client, keypair, ENDPOINT, cert.cert_pem.decode(), {"num_cpus": 2}, ["tiny-llama"], "", seen.append
    )


def test_agent_registers_heartbeats_and_leaves(http: TestClient, registry: NetworkRegistry, cert: CertKey) -> None:
    seen: list[Registration] = []
    agent = agent_for(http, Keypair(), cert, seen)
    registration = agent.register()
    assert seen == [registration] and registration.endpoint == ENDPOINT
    links = registry.provider_links([registration.provider_id])
    assert links[registration.provider_id]["link_token"] == registration.link_token
    agent.heartbeat_once()
    assert agent.heartbeats_ok == 1
    agent.leave()
    assert registry.records[registration.provider_id].health == "draining"


def test_agent_registers_again_when_its_session_is_gone(http: TestClient, cert: CertKey) -> None:
    keypair, seen = Keypair(), []  # type: ignore[var-annotated]
    agent = agent_for(http, keypair, cert, seen)
    first = agent.register()
    agent_for(http, keypair, cert, []).register()  # the same wallet and endpoint again: first's tokens are replaced
    agent.heartbeat_once()
    assert len(seen) == 2 and seen[1].link_token != first.link_token and agent.registration == seen[1]


def test_agent_drains_for_training_heartbeats_on_and_registers_again(
    http: TestClient, registry: NetworkRegistry, cert: CertKey
) -> None:
    keypair, seen = Keypair(), []  # type: ignore[var-annotated]
    agent = agent_for(http, keypair, cert, seen)
    pid = agent.register().provider_id
    agent.drain()
    assert registry.records[pid].health == "draining" and agent.draining
    assert pid not in {r.node_id for r in registry.eligible_nodes()}  # the operator moves its stages away
    agent.heartbeat_once()  # still known and alive, still draining
    assert registry.records[pid].health == "draining"
    # The registry forgets the session while the node trains: it registers again and drains again at once.
    agent_for(http, keypair, cert, []).register()
    agent.heartbeat_once()
    assert registry.records[pid].draining and agent.draining and len(seen) == 2
    agent.register()  # back to serving
    assert registry.records[pid].health == "alive" and not registry.records[pid].draining and not agent.draining
    assert pid in {r.node_id for r in registry.eligible_nodes()}


def test_agent_reports_refusals_with_their_status(http: TestClient, cert: CertKey) -> None:
    agent = agent_for(http, Keypair(), cert, [])
    agent.models = ["not-served"]
    with pytest.raises(RegistrationError) as caught:
        agent.register()
    assert caught.value.status == 400 and "not served" in str(caught.value)


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint": "10.0.0.1:1"},
        {"wallet": str(Keypair().pubkey())},
        {"cert_fingerprint": "0" * 64},
        {"message": "solanalm-provider-register-v1\nsomething else"},
        {"issued_at": 0.0},
        {"expires_at": 0.0},
        {"nonce": None, "issued_at": "soon"},
    ],
)
def test_a_gateway_cannot_get_other_text_signed(cert: CertKey, change: dict) -> None:
    keypair = Keypair()
    now = time.time()
    fields = ProviderChallenge("ab" * 16, str(keypair.pubkey()), ENDPOINT, cert.fingerprint, now, now + 60)
    answer = {**asdict(fields), "message": fields.message().decode()}
    assert checked_challenge(answer, str(keypair.pubkey()), ENDPOINT, cert.fingerprint) == fields
    with pytest.raises(ProofError):
        checked_challenge({**answer, **change}, str(keypair.pubkey()), ENDPOINT, cert.fingerprint)


def test_keygen_writes_a_private_keypair(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from cluster.network.wallet import load_keypair
    from serve_apps.stagehost.cli import app

    path = tmp_path / "id.json"
    result = CliRunner().invoke(app, ["keygen", str(path)])
    assert result.exit_code == 0, result.output
    assert path.stat().st_mode & 0o777 == 0o600 and str(load_keypair(path).pubkey()) in result.output.replace("\n", "")
    assert CliRunner().invoke(app, ["keygen", str(path)]).exit_code == 1  # never overwrites silently


# -- the endpoint probe: only a registrant serving the signed certificate at the endpoint gets in ------------


@contextlib.contextmanager
def tls_listener(cert: CertKey, tmp_path: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 holding `cert` (test code): completes handshakes, then closes."""
    (tmp_path / "c.pem").write_bytes(cert.cert_pem)
    (tmp_path / "k.pem").write_bytes(cert.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(2)
        listener.close()


def test_probe_admits_the_stage_host_that_holds_the_certificate(
    registry: NetworkRegistry, cert: CertKey, tmp_path: Path
) -> None:
    http = app_with(InProcessProviders(registry, probe_timeout_s=2.0), registry)
    with tls_listener(cert, tmp_path) as port:
        endpoint, keypair = f"127.0.0.1:{port}", Keypair()
        body = register_body(get_challenge(http, keypair, cert, endpoint), keypair, cert)
        assert http.post("/v1/providers/register", json=body).status_code == 200


def test_probe_refuses_an_endpoint_served_with_another_certificate(
    registry: NetworkRegistry, cert: CertKey, tmp_path: Path
) -> None:
    http = app_with(InProcessProviders(registry, probe_timeout_s=2.0), registry)
    with tls_listener(self_signed(["127.0.0.1"]), tmp_path) as port:  # someone else's server at that address
        endpoint, squatter = f"127.0.0.1:{port}", Keypair()
        body = register_body(get_challenge(http, squatter, cert, endpoint), squatter, cert)
        assert_error(http.post("/v1/providers/register", json=body), 400, "endpoint_unreachable")
    assert registry.records == {}


def test_probe_refuses_an_endpoint_where_nothing_listens(registry: NetworkRegistry, cert: CertKey) -> None:
    http = app_with(InProcessProviders(registry, probe_timeout_s=2.0), registry)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refused
        keypair = Keypair()
        body = register_body(get_challenge(http, keypair, cert, endpoint), keypair, cert)
        assert_error(http.post("/v1/providers/register", json=body), 400, "endpoint_unreachable")


class FlakyProviders(InProcessProviders):
    """The registry is unavailable for the first `failures` challenges (restarting), then answers."""

    def __init__(self, registry: NetworkRegistry, failures: int) -> None:
        super().__init__(registry)
        self.failures = failures

    async def challenge(self, wallet: str, endpoint: str, cert_fingerprint: str) -> ProviderChallenge:
        if self.failures > 0:
            self.failures -= 1
            raise RegistryUnavailable("restarting")
        return await super().challenge(wallet, endpoint, cert_fingerprint)


def test_agent_retries_while_the_registry_is_unavailable(registry: NetworkRegistry, cert: CertKey) -> None:
    http = app_with(FlakyProviders(registry, failures=2), registry)
    agent = agent_for(http, Keypair(), cert, [])
    assert agent.register(attempts=3, backoff_s=0.01).provider_id in registry.records
    http = app_with(FlakyProviders(registry, failures=5), registry)
    with pytest.raises(RegistrationError) as caught:
        agent_for(http, Keypair(), cert, []).register(attempts=2, backoff_s=0.01)
    assert caught.value.status == 503


# -- an HTTPS gateway: the provider trusts the CA given with --ca-cert, and nothing else -----------------------


@contextlib.contextmanager
def https_gateway(providers: Any, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    import uvicorn

    from cluster.security.certs import create_ca, issue

    ca = create_ca()
    server_cert = issue(ca, ["127.0.0.1"])
    server_cert.write(tmp_path / "gw.crt", tmp_path / "gw.key")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    gateway = Gateway(NoBackend(), [ModelCard("tiny-llama", "tests")], providers=providers)  # type: ignore[arg-type]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_gateway_app(gateway),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ssl_certfile=str(tmp_path / "gw.crt"),
        ssl_keyfile=str(tmp_path / "gw.key"),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"https://127.0.0.1:{port}", tmp_path / "ca.crt"
    finally:
        server.should_exit = True
        thread.join(5)


def test_https_gateway_is_verified_with_the_given_ca(fake: InProcessProviders, cert: CertKey, tmp_path: Path) -> None:
    with https_gateway(fake, tmp_path) as (url, ca_cert):
        keypair = Keypair()
        args = (keypair, ENDPOINT, cert.cert_pem.decode(), {}, ["tiny-llama"])
        client = GatewayClient(url, ca_cert=ca_cert)
        assert register(client, *args).wallet == str(keypair.pubkey())
        client.close()
        untrusting = GatewayClient(url)  # the system CAs do not know this gateway's CA
        with pytest.raises(RegistrationError, match="unreachable"):
            register(untrusting, *args)
        untrusting.close()
