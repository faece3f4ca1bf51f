"""Provider registration (pure): proofs bound to wallet, endpoint and certificate; tokens; heartbeats."""

import time
from dataclasses import asdict, replace
from typing import Any

import pytest
from solders.keypair import Keypair

from cluster.config.network import NetworkSection, ProvidersSection
from cluster.network import providers as P
from cluster.network.records import NodeRecord
from cluster.network.registry import NetworkRegistry
from cluster.network.wallet import (
    ChallengeBook,
    ProofError,
    ProviderProof,
    TooManyChallenges,
    sign_challenge,
    sign_provider_challenge,
)
from cluster.security.certs import CertKey, self_signed

ENDPOINT = "127.0.0.1:7443"
NOW = time.time()  # certificates are valid from (real) now; the registry's clock is passed explicitly


@pytest.fixture(scope="module")
def cert() -> CertKey:
    return self_signed(["127.0.0.1"])


@pytest.fixture()
def registry() -> NetworkRegistry:
    return NetworkRegistry(NetworkSection())


def proof_json(proof: ProviderProof) -> dict[str, Any]:
    return {"challenge": asdict(proof.challenge), "signature": proof.signature}


def signed(registry: NetworkRegistry, keypair: Keypair, cert: CertKey, endpoint: str = ENDPOINT) -> dict[str, Any]:
    challenge = registry.issue_provider_challenge(str(keypair.pubkey()), endpoint, cert.fingerprint, NOW)
    return proof_json(sign_provider_challenge(keypair, challenge))


def register(
    registry: NetworkRegistry, keypair: Keypair, cert: CertKey, endpoint: str = ENDPOINT, now: float = NOW, **kw: Any
) -> P.ProviderRegistration:
    proof = signed(registry, keypair, cert, endpoint)
    caps = kw.pop("capabilities", {"num_cpus": 4, "memory_bytes": 2**33, "throughput_gflops": 20.0})
    return registry.register_provider(proof, cert.cert_pem.decode(), caps, kw.pop("models", ["tiny-llama"]), now, **kw)


def test_registration_makes_a_provider_record_and_two_tokens(registry: NetworkRegistry, cert: CertKey) -> None:
    keypair = Keypair()
    result = register(registry, keypair, cert, region="eu-west")
    record = result.record
    assert record.node_id.startswith("provider-") and record.kind == "provider"
    assert (record.wallet, record.endpoint, record.models, record.region) == (
        str(keypair.pubkey()),
        ENDPOINT,
        ("tiny-llama",),
        "eu-west",
    )
    assert record.cert_pem == cert.cert_pem.decode() and record.capabilities.num_cpus == 4
    assert result.session_token != result.link_token and len(result.link_token) >= 40
    assert result.heartbeat_interval_s == ProvidersSection().heartbeat_interval_s
    assert [r.node_id for r in registry.eligible_nodes()] == [record.node_id]
    # Secrets live apart from the record: nothing that lists records can leak them.
    dumped = str(record.to_json())
    assert result.link_token not in dumped and result.session_token not in dumped
    assert P.token_sha256(result.session_token) in {s.session_sha256 for s in registry.provider_secrets.values()}
    assert result.session_token not in str(registry.provider_secrets)
    links = registry.provider_links([record.node_id, "ghost"])
    assert links == {
        record.node_id: {
            "endpoint": ENDPOINT,
            "cert_pem": record.cert_pem,
            "link_token": result.link_token,
            "wallet": record.wallet,
        }
    }


def test_forged_signature_is_refused(registry: NetworkRegistry, cert: CertKey) -> None:
    keypair = Keypair()
    proof = signed(registry, keypair, cert)
    challenge = registry.provider_challenges.pending[proof["challenge"]["nonce"]]
    proof["signature"] = str(Keypair().sign_message(challenge.message()))
    with pytest.raises(ProofError, match="does not verify"):
        registry.register_provider(proof, cert.cert_pem.decode(), {}, [], NOW)
    assert registry.records == {}


def test_replayed_nonce_is_refused(registry: NetworkRegistry, cert: CertKey) -> None:
    keypair = Keypair()
    proof = signed(registry, keypair, cert)
    registry.register_provider(proof, cert.cert_pem.decode(), {}, [], NOW)
    with pytest.raises(ProofError, match="already used"):
        registry.register_provider(proof, cert.cert_pem.decode(), {}, [], NOW)


def test_a_failed_attempt_consumes_the_nonce(registry: NetworkRegistry, cert: CertKey) -> None:
    keypair = Keypair()
    proof = signed(registry, keypair, cert)
    good = proof["signature"]
    proof["signature"] = str(Keypair().sign_message(b"x"))
    with pytest.raises(ProofError):
        registry.register_provider(proof, cert.cert_pem.decode(), {}, [], NOW)
    with pytest.raises(ProofError, match="already used"):
        registry.register_provider({**proof, "signature": good}, cert.cert_pem.decode(), {}, [], NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [("endpoint", "127.0.0.1:7444"), ("cert_fingerprint", "0" * 64), ("expires_at", NOW + 10_000), ("wallet", None)],
)
def test_altered_fields_are_refused(registry: NetworkRegistry, cert: CertKey, field: str, value: Any) -> None:
    keypair = Keypair()
    challenge = registry.issue_provider_challenge(str(keypair.pubkey()), ENDPOINT, cert.fingerprint, NOW)
    signer = keypair
    if field == "wallet":
        signer = Keypair()
        value = str(signer.pubkey())
    altered = replace(challenge, **{field: value})
    with pytest.raises(ProofError, match="altered"):
        registry.register_provider(
            proof_json(sign_provider_challenge(signer, altered)), cert.cert_pem.decode(), {}, [], NOW
        )


def test_expired_challenge_is_refused(registry: NetworkRegistry, cert: CertKey) -> None:
    keypair = Keypair()
    proof = signed(registry, keypair, cert)
    later = NOW + ProvidersSection().challenge_ttl_s + 1
    with pytest.raises(ProofError, match="expired"):
        registry.register_provider(proof, cert.cert_pem.decode(), {}, [], later)


def test_wrong_certificate_for_the_signed_fingerprint_is_refused(registry: NetworkRegistry, cert: CertKey) -> None:
    proof = signed(registry, Keypair(), cert)
    other = self_signed(["127.0.0.1"])
    with pytest.raises(ProofError, match="fingerprint"):
        registry.register_provider(proof, other.cert_pem.decode(), {}, [], NOW)
    assert registry.records == {}


def test_certificate_must_name_the_endpoint_host(registry: NetworkRegistry) -> None:
    wrong_host = self_signed(["stage.example.org"])
    proof = signed(registry, Keypair(), wrong_host)
    with pytest.raises(P.ProviderRequestError, match="does not name"):
        registry.register_provider(proof, wrong_host.cert_pem.decode(), {}, [], NOW)


def test_wallet_a_challenge_signed_by_wallet_b_is_refused(registry: NetworkRegistry, cert: CertKey) -> None:
    a, b = Keypair(), Keypair()
    challenge = registry.issue_provider_challenge(str(a.pubkey()), ENDPOINT, cert.fingerprint, NOW)
    with pytest.raises(ProofError, match="keypair"):
        sign_provider_challenge(b, challenge)  # the honest client refuses; a forger signs anyway:
    forged = {"challenge": asdict(challenge), "signature": str(b.sign_message(challenge.message()))}
    with pytest.raises(ProofError, match="does not verify"):
        registry.register_provider(forged, cert.cert_pem.decode(), {}, [], NOW)


def test_a_join_proof_is_not_a_registration_proof(cert: CertKey) -> None:
    book, keypair = ChallengeBook(ttl_s=60), Keypair()
    join = book.issue("n" * 56, str(keypair.pubkey()), NOW)
    provider = book.issue_provider(str(keypair.pubkey()), ENDPOINT, cert.fingerprint, NOW)
    assert join.message().splitlines()[0] != provider.message().splitlines()[0]
    # Same nonce, other kind: the issued challenge differs from the presented one.
    mixed = ProviderProof(replace(provider, nonce=join.nonce), sign_challenge(keypair, join).signature)
    with pytest.raises(ProofError, match="altered"):
        book.verify(mixed, NOW)


@pytest.mark.parametrize(
    ("caps", "models", "region", "message"),
    [
        ({"num_cpus": -1}, [], "", "capabilities"),
        ({"num_cpus": float("nan")}, [], "", "capabilities"),
        ({"memory_bytes": 2**60}, [], "", "capabilities"),
        ({"gpu": 1}, [], "", "capabilities"),
        ({}, ["bad name!"], "", "malformed"),
        ({}, ["a", "a"], "", "twice"),
        ({}, [f"m{i}" for i in range(17)], "", "at most"),
        ({}, [], "bad region!", "region"),
    ],
)
def test_out_of_bounds_requests_are_refused_before_the_proof(
    registry: NetworkRegistry, cert: CertKey, caps: dict, models: list[str], region: str, message: str
) -> None:
    proof = signed(registry, Keypair(), cert)
    with pytest.raises(P.ProviderRequestError, match=message):
        registry.register_provider(proof, cert.cert_pem.decode(), caps, models, NOW, region)
    assert proof["challenge"]["nonce"] in registry.provider_challenges.pending  # a malformed request keeps it


def test_models_outside_the_served_catalogue_are_refused(registry: NetworkRegistry, cert: CertKey) -> None:
    with pytest.raises(P.ProviderRequestError, match="not served"):
        register(registry, Keypair(), cert, models=["other"], allowed_models={"tiny-llama"})
    assert register(registry, Keypair(), cert, models=[], allowed_models={"tiny-llama"}).record.models == ()


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1", "host:0", "host:65536", "0.0.0.0:80", "224.0.0.1:80", "ex ample:80", "::1:80", "[::1]"]
)
def test_malformed_endpoints_get_no_challenge(registry: NetworkRegistry, cert: CertKey, endpoint: str) -> None:
    with pytest.raises(P.ProviderRequestError):
        registry.issue_provider_challenge(str(Keypair().pubkey()), endpoint, cert.fingerprint, NOW)


def test_private_endpoints_can_be_refused(cert: CertKey) -> None:
    registry = NetworkRegistry(NetworkSection(providers=ProvidersSection(allow_private_endpoints=False)))
    for endpoint in ("127.0.0.1:1", "10.1.2.3:1", "localhost:1", "[fe80::1]:1"):
        with pytest.raises(P.ProviderRequestError):
            registry.issue_provider_challenge(str(Keypair().pubkey()), endpoint, cert.fingerprint, NOW)
    registry.issue_provider_challenge(str(Keypair().pubkey()), "8.8.8.8:443", cert.fingerprint, NOW)


def test_bad_fingerprint_and_wallet_get_no_challenge(registry: NetworkRegistry) -> None:
    with pytest.raises(P.ProviderRequestError):
        registry.issue_provider_challenge(str(Keypair().pubkey()), ENDPOINT, "ABC", NOW)
    with pytest.raises(ProofError, match="wallet"):
        registry.issue_provider_challenge("not-a-wallet", ENDPOINT, "0" * 64, NOW)


def test_pending_challenges_are_bounded(cert: CertKey) -> None:
    registry = NetworkRegistry(NetworkSection(providers=ProvidersSection(max_pending_challenges=2)))
    wallet = str(Keypair().pubkey())
    for _ in range(2):
        registry.issue_provider_challenge(wallet, ENDPOINT, cert.fingerprint, NOW)
    with pytest.raises(TooManyChallenges):
        registry.issue_provider_challenge(wallet, ENDPOINT, cert.fingerprint, NOW)
    later = NOW + ProvidersSection().challenge_ttl_s + 1  # expired ones are forgotten
    registry.issue_provider_challenge(wallet, ENDPOINT, cert.fingerprint, later)


def test_reregistering_replaces_the_tokens_and_keeps_the_history(registry: NetworkRegistry, cert: CertKey) -> None:
    keypair = Keypair()
    first = register(registry, keypair, cert)
    pid = first.record.node_id
    registry.record_verification([pid], passed=False)
    second = register(registry, keypair, cert, models=[])
    assert second.record.node_id == pid and len(registry.records) == 1
    assert second.record.reputation == pytest.approx(0.25) and second.record.verifications_failed == 1
    assert second.session_token != first.session_token and second.link_token != first.link_token
    with pytest.raises(P.UnknownSession):
        registry.provider_heartbeat(first.session_token, NOW)
    assert registry.provider_heartbeat(second.session_token, NOW).node_id == pid
    assert registry.provider_links([pid])[pid]["link_token"] == second.link_token


def test_joining_reputation_follows_the_wallet(registry: NetworkRegistry, cert: CertKey) -> None:
    keypair = Keypair()
    first = register(registry, keypair, cert)
    registry.record_verification([first.record.node_id], passed=False)
    other = self_signed(["127.0.0.1"])
    assert register(registry, keypair, other, endpoint="127.0.0.1:7444").record.reputation == pytest.approx(0.25)
    assert register(registry, Keypair(), other, endpoint="127.0.0.1:7445").record.reputation == 0.5


def test_wallet_limit_and_endpoint_conflicts(cert: CertKey) -> None:
    registry = NetworkRegistry(NetworkSection(providers=ProvidersSection(max_per_wallet=1)))
    keypair = Keypair()
    register(registry, keypair, cert)
    with pytest.raises(P.ProviderConflict, match="maximum"):
        register(registry, keypair, cert, endpoint="127.0.0.1:7444")
    with pytest.raises(P.ProviderConflict, match="another live provider"):
        register(registry, Keypair(), cert)
    registry.sync_health([], NOW + 1000)  # the first lapses: its endpoint and the wallet's slot are free
    register(registry, Keypair(), cert)
    register(registry, keypair, cert, endpoint="127.0.0.1:7444")


def test_heartbeats_keep_a_provider_alive_and_a_lapse_kills_it(registry: NetworkRegistry, cert: CertKey) -> None:
    result = register(registry, Keypair(), cert)
    pid, ttl = result.record.node_id, ProvidersSection().heartbeat_ttl_s
    assert registry.sync_health([], NOW + ttl - 1) == []
    registry.provider_heartbeat(result.session_token, NOW + ttl - 1)
    assert registry.sync_health([], NOW + 2 * ttl - 2) == []
    assert registry.sync_health([], NOW + 2 * ttl) == [pid]
    assert registry.records[pid].health == "dead" and registry.eligible_nodes() == []
    # A provider back from a network blip is alive again (its session is still valid).
    assert registry.provider_heartbeat(result.session_token, NOW + 2 * ttl).health == "alive"


def test_leave_drains_and_heartbeats_do_not_undrain(registry: NetworkRegistry, cert: CertKey) -> None:
    result = register(registry, Keypair(), cert)
    assert registry.provider_leave(result.session_token).health == "draining"
    assert registry.provider_heartbeat(result.session_token, NOW + 1).health == "draining"
    assert registry.eligible_nodes() == []


@pytest.mark.parametrize("token", ["", "not-issued", "x" * 5000])
def test_unknown_sessions_are_refused(registry: NetworkRegistry, cert: CertKey, token: str) -> None:
    register(registry, Keypair(), cert)
    with pytest.raises(P.UnknownSession):
        registry.provider_heartbeat(token, NOW)
    with pytest.raises(P.UnknownSession):
        registry.provider_leave(token)


def test_sync_health_leaves_providers_to_their_heartbeats(registry: NetworkRegistry, cert: CertKey) -> None:
    pid = register(registry, Keypair(), cert).record.node_id
    # Ray's node table never lists providers; that must not make them dead.
    assert registry.sync_health([{"NodeID": "n1", "Alive": True}]) == []
    assert registry.sync_health([{"NodeID": "n1", "Alive": True}], NOW + 1) == []
    assert registry.records[pid].health == "alive"


def test_old_records_without_kind_load_as_ray_nodes() -> None:
    stored = {
        "node_id": "abc",
        "wallet": "w",
        "region": "",
        "labels": {},
        "capabilities": {"num_cpus": 2.0},
        "verified": True,
        "health": "alive",
        "draining": False,
        "joined_at": 1.0,
        "requests_served": 3,
        "failures": 0,
        "verifications_passed": 0,
        "verifications_failed": 0,
        "latency_ewma_s": None,
        "reputation": 0.5,
    }
    record = NodeRecord.from_json(stored)
    assert (record.kind, record.endpoint, record.models, record.requests_served) == ("ray", "", (), 3)


def test_provider_records_and_secrets_round_trip_json(registry: NetworkRegistry, cert: CertKey) -> None:
    import json

    result = register(registry, Keypair(), cert)
    record = registry.take_dirty()[0]
    assert NodeRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    secret = registry.take_dirty_secrets()[0]
    assert P.ProviderSecrets.from_json(json.loads(json.dumps(secret.to_json()))) == secret
    # A registry rebuilt from the stored state accepts the same session.
    rebuilt = NetworkRegistry(
        NetworkSection(), records={record.node_id: record}, provider_secrets={secret.provider_id: secret}
    )
    assert rebuilt.provider_heartbeat(result.session_token, NOW).node_id == record.node_id


def test_heartbeat_ttl_must_exceed_the_interval() -> None:
    with pytest.raises(ValueError, match="must exceed"):
        ProvidersSection(heartbeat_interval_s=30, heartbeat_ttl_s=20)
    assert NetworkSection().provider_ttl_s == ProvidersSection().heartbeat_ttl_s
