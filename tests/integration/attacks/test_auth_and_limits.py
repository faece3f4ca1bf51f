"""Rate limits and sign-in under attack, over HTTP against the paid deployment on 127.0.0.1.

Each test speaks from its own made-up client address (X-Forwarded-For, which the Serve proxy believes
from 127.0.0.1 only), so filling a bucket here never throttles the other attack tests.
"""

import asyncio
import random
import secrets
import time
from datetime import datetime, timedelta

import httpx
from solders.keypair import Keypair

from tests.integration.attacks.conftest import MODEL, RATE_LIMITS, PaidApp

CONCURRENCY = 32


def fake_address() -> str:
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


def from_address(address: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Forwarded-For": address, **(headers or {})}


def random_key() -> dict[str, str]:
    return {"Authorization": f"Bearer slm_{secrets.token_urlsafe(24)}"}


async def _burst(
    paid: PaidApp, method: str, path: str, count: int, headers_of: object, json: dict | None = None
) -> tuple[list[httpx.Response], float]:
    """`count` requests, CONCURRENCY at a time; `headers_of(i)` gives each one's headers."""
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=paid.base_url.removesuffix("/v1"), timeout=60, limits=limits) as http:

        async def one(i: int) -> httpx.Response:
            async with gate:
                return await http.request(method, path, json=json, headers=headers_of(i))  # type: ignore[operator]

        started = time.monotonic()
        responses = await asyncio.gather(*(one(i) for i in range(count)))
        return list(responses), time.monotonic() - started


def burst(
    paid: PaidApp, method: str, path: str, count: int, headers_of: object, json: dict | None = None
) -> tuple[list[httpx.Response], float]:
    return asyncio.run(_burst(paid, method, path, count, headers_of, json))


def assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "rate_limit_exceeded"


def assert_bucket_held(responses: list[httpx.Response], elapsed_s: float, limit: dict[str, int], route: str) -> None:
    """Some were refused, and no more passed than the limit allows over the time the burst took."""
    statuses = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert refused, f"{route}: {len(statuses)} requests from one address in {elapsed_s:.1f} s, none limited"
    assert_rate_limited(refused[0])
    windows = int(elapsed_s // limit["window_s"]) + 2  # a sliding window counter: at most `requests` per window
    assert len(statuses) - len(refused) <= limit["requests"] * windows, (route, elapsed_s, len(refused))


def margin(limit: dict[str, int]) -> int:
    """Enough requests to overflow a sliding window counter even when a burst straddles two windows (the
    counter weighs the previous window's requests as if spread evenly over it)."""
    return limit["requests"] * 5 // 4 + 10


def sign_in(paid: PaidApp, keypair: Keypair, address: str, **extra: object) -> httpx.Response:
    challenge = httpx.post(
        paid.base_url + "/auth/challenge",
        json={"wallet": str(keypair.pubkey())},
        headers=from_address(address),
        timeout=30,
    )
    challenge.raise_for_status()
    message = challenge.json()["message"]
    signature = str(keypair.sign_message(message.encode()))
    return httpx.post(
        paid.base_url + "/auth/verify",
        json={"message": message, "signature": signature, **extra},
        headers=from_address(address),
        timeout=30,
    )


def completion(paid: PaidApp, headers: dict[str, str], model: str = MODEL) -> httpx.Response:
    return httpx.post(
        paid.base_url + "/completions",
        json={"model": model, "prompt": "x", "max_tokens": 1},
        headers=headers,
        timeout=60,
    )


# (a) ------------------------------------------------------------------------------------------------
def test_random_authorization_headers_from_one_address_share_its_bucket(paid: PaidApp) -> None:
    limit = RATE_LIMITS["per_address"]
    address = fake_address()
    responses, elapsed_s = burst(
        paid,
        "POST",
        "/v1/completions",
        limit["requests"] + 250,
        lambda _: from_address(address, random_key()),
        json={"model": MODEL, "prompt": "x", "max_tokens": 1},
    )
    assert {r.status_code for r in responses} <= {401, 429}
    assert_bucket_held(responses, elapsed_s, limit, "completions with random keys")
    # The bucket is the address's: another address is not limited by it.
    assert completion(paid, from_address(fake_address(), random_key())).status_code == 401


# (b) ------------------------------------------------------------------------------------------------
def test_new_keys_and_other_wallets_do_not_reset_a_wallets_bucket(paid: PaidApp) -> None:
    limit = RATE_LIMITS["per_wallet"]
    address = fake_address()
    victim = Keypair()
    first = sign_in(paid, victim, address)
    assert first.status_code == 200, first.text
    headers = from_address(address, {"Authorization": f"Bearer {first.json()['api_key']}"})
    # Unknown model: each request passes the wallet's bucket, then is a cheap 404.
    responses, _ = burst(
        paid,
        "POST",
        "/v1/completions",
        limit["requests"] * 5 // 4 + 10,  # overflows the sliding window counter even across two windows
        lambda _: headers,
        json={"model": "no-such-model", "prompt": "x", "max_tokens": 1},
    )
    codes = [r.status_code for r in responses]
    assert set(codes) <= {404, 429} and codes.count(404) >= limit["requests"], codes
    assert_rate_limited(completion(paid, headers, "no-such-model"))
    # A second key of the same wallet, from another address: the same wallet bucket.
    second = sign_in(paid, victim, fake_address())
    assert second.status_code == 200, second.text
    second_headers = {"Authorization": f"Bearer {second.json()['api_key']}"}
    assert_rate_limited(completion(paid, from_address(fake_address(), second_headers), "no-such-model"))
    # Many other clients (random keys from many addresses, fresh wallets) do not evict the victim's bucket.
    others, _ = burst(
        paid,
        "POST",
        "/v1/completions",
        300,
        lambda _: from_address(fake_address(), random_key()),
        json={"model": MODEL, "prompt": "x", "max_tokens": 1},
    )
    assert {r.status_code for r in others} == {401}
    for _ in range(3):
        other = sign_in(paid, Keypair(), fake_address())
        assert other.status_code == 200, other.text
    assert_rate_limited(completion(paid, headers, "no-such-model"))


# (c) ------------------------------------------------------------------------------------------------
def test_auth_deposit_and_health_routes_are_limited_per_address(paid: PaidApp) -> None:
    wallet = str(Keypair().pubkey())
    for name, method, path, body in (
        ("auth", "POST", "/v1/auth/challenge", {"wallet": wallet}),
        ("deposits", "GET", "/v1/deposits/info", None),
        ("health", "GET", "/healthz", None),
    ):
        limit = RATE_LIMITS[name]
        address = fake_address()
        responses, elapsed_s = burst(paid, method, path, margin(limit), lambda _, a=address: from_address(a), json=body)
        assert {r.status_code for r in responses} <= {200, 429}, (path, {r.status_code for r in responses})
        assert_bucket_held(responses, elapsed_s, limit, path)
    # Deposits are limited before authentication too: a refused address gets 429, not 401.
    address = fake_address()
    limit = RATE_LIMITS["deposits"]
    burst(paid, "GET", "/v1/deposits/info", margin(limit), lambda _: from_address(address))
    posted = httpx.post(paid.base_url + "/deposits", json={"signature": "x"}, headers=from_address(address), timeout=30)
    assert_rate_limited(posted)


# (d) ------------------------------------------------------------------------------------------------
def _challenge(paid: PaidApp, keypair: Keypair) -> str:
    response = httpx.post(paid.base_url + "/auth/challenge", json={"wallet": str(keypair.pubkey())}, timeout=30)
    response.raise_for_status()
    return str(response.json()["message"])


def _verify(paid: PaidApp, keypair: Keypair, message: str) -> httpx.Response:
    signature = str(keypair.sign_message(message.encode()))
    return httpx.post(paid.base_url + "/auth/verify", json={"message": message, "signature": signature}, timeout=30)


def assert_401(response: httpx.Response, what: str) -> None:
    assert response.status_code == 401, f"{what}: {response.status_code} {response.text}"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_sign_in_message_must_be_the_one_issued_to_that_wallet(paid: PaidApp) -> None:
    wallet = Keypair()
    issued = _challenge(paid, wallet)
    statement = issued.split("\n")[3]
    assert_401(
        _verify(paid, wallet, issued.replace(statement, "Sign in to SolanaLM and approve a transfer of 10 SOL.")),
        "altered statement",
    )
    uri = next(line for line in issued.split("\n") if line.startswith("URI: "))
    assert_401(_verify(paid, wallet, issued.replace(uri, "URI: https://evil.example/login")), "altered URI")
    expires = next(line for line in issued.split("\n") if line.startswith("Expiration Time: "))
    later = datetime.fromisoformat(expires.removeprefix("Expiration Time: ").replace("Z", "+00:00")) + timedelta(
        seconds=200
    )
    longer = issued.replace(expires, "Expiration Time: " + later.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert_401(_verify(paid, wallet, longer), "altered expiration time")
    # A nonce issued for wallet A, used by wallet B in a message naming B.
    a, b = Keypair(), Keypair()
    for_a = _challenge(paid, a)
    assert_401(_verify(paid, b, for_a.replace(str(a.pubkey()), str(b.pubkey()))), "A's nonce used by B")
    # The message as issued still works once; a replay does not.
    good = _verify(paid, wallet, issued)
    assert good.status_code == 200, good.text
    assert_401(_verify(paid, wallet, issued), "replay")


# (e) ------------------------------------------------------------------------------------------------
def test_an_expired_api_key_is_401_expired_api_key(paid: PaidApp) -> None:
    wallet = Keypair()
    verified = sign_in(paid, wallet, fake_address(), ttl_s=2)
    assert verified.status_code == 200, verified.text
    body = verified.json()
    assert body["expires_at"] <= time.time() + 3
    headers = {"Authorization": f"Bearer {body['api_key']}"}
    assert httpx.get(paid.base_url + "/balance", headers=headers, timeout=30).status_code == 200
    time.sleep(3)
    for response in (
        httpx.get(paid.base_url + "/balance", headers=headers, timeout=30),
        completion(paid, headers),
    ):
        assert_401(response, "expired key")
        assert response.json()["error"]["code"] == "expired_api_key"
    # A key asked for without ttl_s lives the configured api_key_ttl_s.
    default = sign_in(paid, wallet, fake_address()).json()
    assert default["expires_at"] >= time.time() + paid.settings.payments.api_key_ttl_s - 60


# (f) ------------------------------------------------------------------------------------------------
def test_listing_keys_shows_only_the_callers_own_keys(paid: PaidApp) -> None:
    owner, stranger = Keypair(), Keypair()
    first = sign_in(paid, owner, fake_address()).json()
    second = sign_in(paid, owner, fake_address()).json()
    theirs = sign_in(paid, stranger, fake_address()).json()
    revoked = httpx.delete(
        paid.base_url + f"/auth/keys/{first['id']}", headers={"Authorization": f"Bearer {second['api_key']}"}
    )
    assert revoked.status_code == 200, revoked.text
    listed = httpx.get(paid.base_url + "/auth/keys", headers={"Authorization": f"Bearer {second['api_key']}"})
    assert listed.status_code == 200, listed.text
    keys = {k["id"]: k for k in listed.json()["data"]}
    assert set(keys) == {first["id"], second["id"]}
    assert keys[first["id"]]["revoked_at"] is not None and keys[second["id"]]["revoked_at"] is None
    assert all(k["wallet"] == str(owner.pubkey()) and k["expires_at"] > k["created_at"] for k in keys.values())
    assert first["api_key"] not in listed.text and second["api_key"] not in listed.text
    assert theirs["id"] not in listed.text
    assert_401(httpx.get(paid.base_url + "/auth/keys", timeout=30), "no key")
    assert_401(httpx.get(paid.base_url + "/auth/keys", headers=random_key(), timeout=30), "random key")
