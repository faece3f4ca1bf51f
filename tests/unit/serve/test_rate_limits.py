"""Rate limits: per client address before authentication (every route, plus auth/deposit/health buckets),
per wallet after it; buckets expire by time only, so other clients cannot reset them."""

import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cluster.config.rate_limits import RateLimitsSection
from payments.errors import AuthenticationFailed
from payments.protocol import DepositInfo, Hold, HoldRequest, SettlementRecord, UsageReport, WalletIdentity
from serve_apps.gateway.app import Gateway, ModelCard, create_gateway_app
from serve_apps.gateway.limits import RequestLimiter, route_class
from serve_apps.gateway.metering import Metering
from serve_apps.protocol import Accepted, Finished, GenerateRequest, PipelineInfo, TextDelta


def limits(**overrides: Any) -> RateLimitsSection:
    """No limit except the ones named, e.g. limits(per_address=(3, 60))."""
    base = RateLimitsSection.unlimited().model_dump()
    for name, (requests, window_s) in overrides.items():
        base[name] = {"requests": requests, "window_s": window_s}
    return RateLimitsSection.model_validate(base)


class Clock:
    """Stands in for the time module of `limits`' storage and of our limiter."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("limits.storage.memory.time", clock)
    monkeypatch.setattr("limits.strategies.time", clock)
    monkeypatch.setattr("serve_apps.gateway.limits.time", clock)
    return clock


def test_an_address_gets_its_requests_then_waits_for_the_window(clock: Clock) -> None:
    limiter = RequestLimiter(limits(per_address=(3, 10)))
    assert [limiter.check_address("10.0.0.1", "/v1/models") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait_s = limiter.check_address("10.0.0.1", "/v1/models")
    assert 0 < wait_s <= 20
    assert limiter.check_address("10.0.0.2", "/v1/models") == 0.0  # another address: its own bucket
    clock.now += 20.0  # two windows on: the bucket has expired by time
    assert limiter.check_address("10.0.0.1", "/v1/models") == 0.0


def test_a_flood_of_other_keys_does_not_reset_a_bucket(clock: Clock) -> None:
    # The hand-written bucket cleared every bucket past 100,000 clients: a flood of fresh keys reset it.
    # Buckets here are forgotten by time only (5,000 keys keep the test short; the count does not matter).
    limiter = RequestLimiter(limits(per_address=(2, 60), per_wallet=(2, 60)))
    for _ in range(2):
        limiter.check_address("10.0.0.1", "/v1/completions")
        limiter.check_wallet("victim")
    for i in range(5_000):
        limiter.check_wallet(f"w{i}")
    assert limiter.check_address("10.0.0.1", "/v1/completions") > 0
    assert limiter.check_wallet("victim") > 0


def test_route_classes_have_their_own_bucket_besides_the_address(clock: Clock) -> None:
    limiter = RequestLimiter(limits(per_address=(100, 60), auth=(2, 60), deposits=(1, 60), health=(1, 60)))
    assert [route_class(p) for p in ("/v1/auth/verify", "/v1/deposits/info", "/healthz", "/v1/models")] == [
        "auth",
        "deposits",
        "health",
        None,
    ]
    assert route_class("/v1/providers/register") == "auth"
    address = "10.0.0.1"
    assert limiter.check_address(address, "/v1/auth/challenge") == 0.0
    assert limiter.check_address(address, "/v1/auth/verify") == 0.0
    assert limiter.check_address(address, "/v1/auth/challenge") > 0
    assert limiter.check_address(address, "/v1/deposits") == 0.0
    assert limiter.check_address(address, "/v1/deposits/info") > 0
    assert limiter.check_address(address, "/healthz") == 0.0
    assert limiter.check_address(address, "/healthz") > 0
    assert limiter.check_address(address, "/v1/models") == 0.0  # the address's own bucket is not empty


def test_client_address_believes_forwarded_for_from_trusted_proxies_only() -> None:
    limiter = RequestLimiter(limits().model_copy(update={"trusted_proxies": ["10.1.0.0/16"]}))
    assert limiter.client_address("10.1.2.3", "198.51.100.7") == "198.51.100.7"
    # The client's own X-Forwarded-For entries (left of our proxies' hops) are not believed.
    assert limiter.client_address("10.1.2.3", "1.2.3.4, 198.51.100.7, 10.1.9.9") == "198.51.100.7"
    assert limiter.client_address("203.0.113.5", "198.51.100.7") == "203.0.113.5"  # not a proxy of ours
    assert limiter.client_address("10.1.2.3", None) == "10.1.2.3"
    # IPv6 by /64: one holder's addresses share a bucket.
    assert limiter.client_address("2001:db8:1:2::5", None) == limiter.client_address("2001:db8:1:2:ffff::1", None)
    assert limiter.client_address("::ffff:198.51.100.7", None) == "198.51.100.7"


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        RateLimitsSection(trusted_proxies=["proxy.example"])


class Backend:
    def models(self) -> list[str]:
        return ["m"]

    async def stream(self, request: GenerateRequest) -> AsyncIterator:
        yield Accepted(3)
        yield TextDelta("ok", 1)
        yield Finished("stop", 3, 1)

    async def describe(self, model: str) -> PipelineInfo:
        return PipelineInfo(model, "r", "n", "float32", 6, 64, ())


class Payments:
    """`key-<wallet>` signs in as <wallet>; anything else is 401."""

    async def authenticate(self, api_key: str | None) -> WalletIdentity:
        if not api_key or not api_key.startswith("key-"):
            raise AuthenticationFailed("invalid API key")
        return WalletIdentity(api_key.removeprefix("key-"), api_key)

    async def place_hold(self, req: HoldRequest) -> Hold:
        return Hold(req.request_id, req.payer, 1, 1)

    async def release_hold(self, release: Any) -> None:
        return None

    async def report_usage(self, report: UsageReport) -> SettlementRecord:
        return SettlementRecord("set_1", report.request_id, report.payer, report.model, 3, 1, 1, 1, 1, (), 0.0)

    async def deposit_info(self) -> DepositInfo:
        return DepositInfo("treasury", None, 9, "hash", "litesvm")


def app(section: RateLimitsSection, payments: Any = None) -> TestClient:
    gateway = Gateway(
        Backend(), [ModelCard("m", "tests")], metering=Metering(payments), limiter=RequestLimiter(section)
    )
    return TestClient(create_gateway_app(gateway))


def body() -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def assert_429(response: Any) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "rate_limit_exceeded"


def test_random_authorization_headers_share_the_address_bucket() -> None:
    http = app(limits(per_address=(3, 60)), Payments())
    codes = [
        http.post(
            "/v1/chat/completions", json=body(), headers={"Authorization": f"Bearer {secrets.token_hex(8)}"}
        ).status_code
        for _ in range(3)
    ]
    assert codes == [401, 401, 401]
    assert_429(http.post("/v1/chat/completions", json=body(), headers={"Authorization": "Bearer fresh"}))
    assert_429(http.get("/v1/models"))  # every route draws on the address's bucket


def test_a_wallet_is_limited_whichever_key_it_uses() -> None:
    http = app(limits(per_wallet=(2, 60)), Payments())
    for key in ("key-alice", "key-alice"):
        assert http.post("/v1/chat/completions", json=body(), headers={"Authorization": f"Bearer {key}"}).is_success
    limited = http.post("/v1/chat/completions", json=body(), headers={"Authorization": "Bearer key-alice"})
    assert_429(limited)
    assert http.post("/v1/chat/completions", json=body(), headers={"Authorization": "Bearer key-bob"}).is_success


def test_auth_deposit_and_health_routes_are_limited_before_any_handler() -> None:
    http = app(limits(auth=(1, 60), deposits=(1, 60), health=(1, 60)))
    for method, path in (("POST", "/v1/auth/challenge"), ("GET", "/v1/deposits/info"), ("GET", "/healthz")):
        first = http.request(method, path, json={"wallet": "x" * 32} if method == "POST" else None)
        assert first.status_code != 429, path
        assert_429(http.request(method, path, json={"wallet": "x" * 32} if method == "POST" else None))


def test_no_limiter_means_no_limit() -> None:
    http = TestClient(create_gateway_app(Gateway(Backend(), [ModelCard("m", "tests")])))
    assert all(http.post("/v1/chat/completions", json=body()).is_success for _ in range(30))
