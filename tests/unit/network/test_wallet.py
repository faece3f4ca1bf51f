"""Join challenges: signed by the wallet, verified once, rejected when expired, replayed or forged."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from solders.keypair import Keypair

from cluster.network.wallet import ChallengeBook, JoinProof, ProofError, load_keypair, sign_challenge, write_keypair

NODE = "a" * 56


@pytest.fixture()
def keypair() -> Keypair:
    return Keypair.from_seed(bytes(range(32)))


def test_signed_challenge_verifies_once(keypair: Keypair) -> None:
    book = ChallengeBook(ttl_s=60)
    challenge = book.issue(NODE, str(keypair.pubkey()), now=1000.0)
    proof = sign_challenge(keypair, challenge)
    assert book.verify(proof, now=1010.0) == keypair.pubkey()
    with pytest.raises(ProofError, match="already used"):
        book.verify(proof, now=1011.0)


def test_expired_challenge_is_rejected(keypair: Keypair) -> None:
    book = ChallengeBook(ttl_s=60)
    proof = sign_challenge(keypair, book.issue(NODE, str(keypair.pubkey()), now=1000.0))
    with pytest.raises(ProofError, match="expired"):
        book.verify(proof, now=1061.0)


def test_forged_signature_is_rejected(keypair: Keypair) -> None:
    book = ChallengeBook(ttl_s=60)
    challenge = book.issue(NODE, str(keypair.pubkey()), now=0.0)
    forged = JoinProof(challenge, str(Keypair().sign_message(challenge.message())))
    with pytest.raises(ProofError, match="does not verify"):
        book.verify(forged, now=1.0)


def test_altered_challenge_is_rejected(keypair: Keypair) -> None:
    book = ChallengeBook(ttl_s=60)
    challenge = book.issue(NODE, str(keypair.pubkey()), now=0.0)
    altered = replace(challenge, node_id="b" * 56)
    with pytest.raises(ProofError, match="altered"):
        book.verify(sign_challenge(keypair, altered), now=1.0)


def test_wrong_keypair_cannot_sign(keypair: Keypair) -> None:
    challenge = ChallengeBook(ttl_s=60).issue(NODE, str(keypair.pubkey()), now=0.0)
    with pytest.raises(ProofError, match="keypair"):
        sign_challenge(Keypair(), challenge)


def test_bad_wallet_address_is_rejected() -> None:
    with pytest.raises(ProofError, match="wallet"):
        ChallengeBook(ttl_s=60).issue(NODE, "not-base58!", now=0.0)


def test_keypair_file_round_trip(tmp_path: Path, keypair: Keypair) -> None:
    path = write_keypair(keypair, tmp_path / "id.json")
    assert len(json.loads(path.read_text())) == 64
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_keypair(path).pubkey() == keypair.pubkey()
    (tmp_path / "bad.json").write_text("[1, 2, 3]")
    with pytest.raises(ProofError, match="not a Solana keypair"):
        load_keypair(tmp_path / "bad.json")
