"""Wallet sign-in: a good signature gets a key; forged, replayed or expired ones get 401."""

import pytest
from solders.keypair import Keypair
from sqlalchemy import create_engine

from payments.auth import WalletAuth, format_message
from payments.errors import AuthenticationFailed, Forbidden
from payments.ledger.schema import metadata


@pytest.fixture
def auth() -> WalletAuth:
    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    return WalletAuth(engine, "solanalm.test", nonce_ttl_s=300, max_age_s=600)


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
    import time

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
