"""A ledger written before sign-in nonces were bound and API keys expired opens and keeps working."""

import time
from pathlib import Path

from solders.keypair import Keypair
from sqlalchemy import create_engine, text

from payments.auth import WalletAuth, hash_key
from payments.ledger.ledger import Ledger, SplitPolicy
from payments.ledger.upgrade import LEGACY_KEY_TTL_S, upgrade_schema
from payments.pricing import Price

OLD_TABLES = (  # the two tables as the release before issue 18 created them
    "CREATE TABLE siws_nonces (nonce VARCHAR(64) PRIMARY KEY, expires_at FLOAT NOT NULL, used INTEGER NOT NULL)",
    "CREATE TABLE api_keys (id VARCHAR(40) PRIMARY KEY, wallet VARCHAR(64) NOT NULL, key_hash VARCHAR(64) NOT NULL"
    " UNIQUE, created_at FLOAT NOT NULL, revoked_at FLOAT)",
)


def test_an_older_ledger_gets_the_new_columns_and_its_keys_an_expiry(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    made = time.time() - 86_400
    wallet = str(Keypair().pubkey())
    with engine.begin() as conn:
        for ddl in OLD_TABLES:
            conn.execute(text(ddl))
        conn.execute(text("INSERT INTO siws_nonces VALUES ('n' || hex(randomblob(8)), :t, 0)"), {"t": made + 300})
        conn.execute(
            text("INSERT INTO api_keys VALUES ('key_old', :w, :h, :t, NULL)"),
            {"w": wallet, "h": hash_key("slm_old-secret"), "t": made},
        )

    Ledger(engine, lambda _model: Price(0, 0), SplitPolicy(500, 100))  # opening it upgrades it

    auth = WalletAuth(engine, "solanalm.test", nonce_ttl_s=300, max_age_s=600, api_key_ttl_s=3_600)
    assert auth.authenticate("slm_old-secret").wallet == wallet  # the old key still works, until its expiry
    (listed,) = auth.list_keys(wallet)
    assert listed.expires_at == made + LEGACY_KEY_TTL_S
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM siws_nonces")).scalar() == 0  # unbound: dropped
    signer = Keypair()
    challenge = auth.challenge(str(signer.pubkey()))
    key = auth.verify(challenge.message, str(signer.sign_message(challenge.message.encode())))
    assert auth.authenticate(key.secret).wallet == str(signer.pubkey())
    assert upgrade_schema(engine) == []  # a current ledger is left as it is
