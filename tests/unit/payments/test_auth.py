"""Wallet sign-in: a good signature gets a key; forged, replayed, altered or expired ones get 401."""

import time
from datetime import UTC, datetime, timedelta

import pytest
from solders.keypair import Keypair
from sqlalchemy import Engine

from cluster.config.payments import PaymentsSection
from payments.auth import WalletAuth, format_message
from payments.errors import AuthenticationFailed, Forbidden
from payments.ledger.schema import metadata, nonces


@pytest.fixture
def auth(ledger_engine: Engine) -> WalletAuth:
    engine = ledger_engine
    metadata.create_all(engine)
    return WalletAuth(engine, "solanalm.test", nonce_ttl_s=300, max_age_s=600, api_key_ttl_s=3_600)


def sign(wallet: Keypair, message: str) -> str:
    return str(wallet.sign_message(message.encode()))


def test_signed_challenge_issues_a_key_bound_to_the_wallet(auth: WalletAuth) -> None:
    wallet = Keypair()
    challenge = auth.challenge(str(wallet.pubkey()))
    key = auth.verify(challenge.message, sign(wallet, challenge.message))
    assert key.wallet == str(wallet.pubkey()) and key.secret.startswith("slm_")
    assert auth.authenticate(key.secret).wallet == str(wallet.pubkey())
    # only the hash is stored
    with auth.engine.begin() as conn:
        stored = conn.exec_driver_sql("SELECT key_hash FROM api_keys").scalar()
    assert key.secret not in stored


def test_forged_signature_is_rejected(auth: WalletAuth) -> None:
    victim, attacker = Keypair(), Keypair()
    challenge = auth.challenge(str(victim.pubkey()))
    with pytest.raises(AuthenticationFailed) as info:
        auth.verify(challenge.message, sign(attacker, challenge.message))
    assert info.value.status_code == 401 and info.value.code == "invalid_signature"


def test_replayed_nonce_is_rejected(auth: WalletAuth) -> None:
    wallet = Keypair()
    challenge = auth.challenge(str(wallet.pubkey()))
    signature = sign(wallet, challenge.message)
    auth.verify(challenge.message, signature)
    with pytest.raises(AuthenticationFailed) as info:
        auth.verify(challenge.message, signature)
    assert info.value.code == "invalid_nonce"


def test_expired_message_is_rejected(auth: WalletAuth) -> None:
    wallet = Keypair()
    challenge = auth.challenge(str(wallet.pubkey()), now=1_000_000.0)
    with pytest.raises(AuthenticationFailed) as info:
        auth.verify(challenge.message, sign(wallet, challenge.message), now=1_000_000.0 + 301)
    assert info.value.code == "expired_message"


def test_self_made_message_with_unknown_nonce_is_rejected(auth: WalletAuth) -> None:
    wallet = Keypair()
    now = time.time()
    message = format_message("solanalm.test", str(wallet.pubkey()), "deadbeefdeadbeef", now, now + 60)
    with pytest.raises(AuthenticationFailed) as info:
        auth.verify(message, sign(wallet, message))
    assert info.value.code == "invalid_nonce"


def test_message_for_another_domain_is_rejected(auth: WalletAuth) -> None:
    wallet = Keypair()
    challenge = auth.challenge(str(wallet.pubkey()))
    phished = challenge.message.replace("solanalm.test", "evil.example", 1)
    with pytest.raises(AuthenticationFailed):
        auth.verify(phished, sign(wallet, phished))


def test_revoked_key_stops_working_and_only_its_owner_may_revoke(auth: WalletAuth) -> None:
    wallet, other = Keypair(), Keypair()
    challenge = auth.challenge(str(wallet.pubkey()))
    key = auth.verify(challenge.message, sign(wallet, challenge.message))
    with pytest.raises(Forbidden):
        auth.revoke(key.key_id, str(other.pubkey()))
    auth.revoke(key.key_id, str(wallet.pubkey()))
    with pytest.raises(AuthenticationFailed):
        auth.authenticate(key.secret)
    with pytest.raises(AuthenticationFailed):
        auth.authenticate("slm_not-a-key")


def refused(auth: WalletAuth, wallet: Keypair, message: str, now: float | None = None) -> str | None:
    """The 401 code of verifying `message` signed by `wallet`."""
    with pytest.raises(AuthenticationFailed) as info:
        auth.verify(message, sign(wallet, message), now=now)
    assert info.value.status_code == 401
    return info.value.code


def test_the_signed_text_must_be_the_issued_text(auth: WalletAuth) -> None:
    wallet = Keypair()
    issued = auth.challenge(str(wallet.pubkey())).message
    statement = issued.split("\n")[3]
    assert refused(auth, wallet, issued.replace(statement, "Approve a transfer of 10 SOL.")) == "invalid_message"
    assert refused(auth, wallet, issued.replace("URI: https://solanalm.test", "URI: https://evil.example")) == (
        "invalid_message"
    )
    expires = issued.split("\n")[-1].removeprefix("Expiration Time: ")
    later = datetime.fromisoformat(expires.replace("Z", "+00:00")) + timedelta(seconds=120)
    longer = issued.replace(expires, later.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert refused(auth, wallet, longer) == "invalid_message"
    auth.verify(issued, sign(wallet, issued))  # the text as issued still signs in


def test_a_nonce_issued_to_one_wallet_cannot_sign_in_another(auth: WalletAuth) -> None:
    a, b = Keypair(), Keypair()
    for_a = auth.challenge(str(a.pubkey())).message
    assert refused(auth, b, for_a.replace(str(a.pubkey()), str(b.pubkey()))) == "invalid_nonce"
    auth.verify(for_a, sign(a, for_a))  # still A's to use


def test_an_expired_nonce_is_refused_and_purged_at_the_next_challenge(auth: WalletAuth) -> None:
    wallet = Keypair()
    old = auth.challenge(str(wallet.pubkey()), now=1_000_000.0)
    assert refused(auth, wallet, old.message, now=1_000_000.0 + 301) == "expired_message"
    for i in range(5):
        auth.challenge(str(Keypair().pubkey()), now=1_000_000.0 + i)
    auth.challenge(str(wallet.pubkey()), now=1_000_000.0 + 400)  # all earlier nonces have expired
    with auth.engine.begin() as conn:
        assert len(conn.execute(nonces.select()).all()) == 1  # only the live one


def test_api_keys_expire_and_a_client_may_ask_for_a_shorter_life(auth: WalletAuth) -> None:
    wallet = Keypair()
    challenge = auth.challenge(str(wallet.pubkey()))
    key = auth.verify(challenge.message, sign(wallet, challenge.message))
    assert key.expires_at == pytest.approx(key.created_at + 3_600)
    assert auth.authenticate(key.secret, now=key.expires_at - 1).wallet == str(wallet.pubkey())
    with pytest.raises(AuthenticationFailed) as info:
        auth.authenticate(key.secret, now=key.expires_at)
    assert info.value.status_code == 401 and info.value.code == "expired_api_key"
    short = auth.challenge(str(wallet.pubkey()))
    assert auth.verify(short.message, sign(wallet, short.message), ttl_s=60).expires_at <= time.time() + 60
    long = auth.challenge(str(wallet.pubkey()))
    capped = auth.verify(long.message, sign(wallet, long.message), ttl_s=10**7)
    assert capped.expires_at == pytest.approx(capped.created_at + 3_600)  # never past api_key_ttl_s


def test_a_wallet_lists_its_own_keys_only_without_secrets(auth: WalletAuth) -> None:
    owner, other = Keypair(), Keypair()
    keys = []
    for wallet in (owner, owner, other):
        challenge = auth.challenge(str(wallet.pubkey()))
        keys.append(auth.verify(challenge.message, sign(wallet, challenge.message)))
    auth.revoke(keys[0].key_id, str(owner.pubkey()))
    listed = auth.list_keys(str(owner.pubkey()))
    assert {k.key_id for k in listed} == {keys[0].key_id, keys[1].key_id}
    revoked = {k.key_id: k.revoked_at for k in listed}
    assert revoked[keys[0].key_id] is not None and revoked[keys[1].key_id] is None
    assert all(k.wallet == str(owner.pubkey()) and k.expires_at > k.created_at for k in listed)
    assert not any(key.secret in repr(listed) for key in keys)


@pytest.mark.parametrize("domain", ["localhost", "127.0.0.1", "[::1]:8000", "app.localhost"])
def test_a_paid_deployment_refuses_a_loopback_sign_in_domain(domain: str) -> None:
    with pytest.raises(ValueError, match="siws_domain"):
        PaymentsSection(enabled=True, siws_domain=domain)
    PaymentsSection(enabled=True, siws_domain=domain, siws_allow_local_domain=True)  # local tests say so
    PaymentsSection(enabled=True, open_mode=True, siws_domain=domain)  # open mode signs nobody in
    PaymentsSection(enabled=True, siws_domain="solanalm.example")
