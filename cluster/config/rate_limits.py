"""Rate-limit settings of the gateway (http.rate_limits): per client address, per wallet, per route class."""

from ipaddress import ip_network

from pydantic import Field, field_validator

from cluster.config.base import Section


class RateLimit(Section):
    """At most `requests` per `window_s` seconds (a sliding window); 0 requests: no limit."""

    requests: int = Field(ge=0, le=10_000_000, description="Requests allowed per window; 0: no limit.")
    window_s: int = Field(default=60, ge=1, le=86_400, description="Length of the window, seconds.")


class RateLimitsSection(Section):
    """Buckets of the gateway, one per client address before authentication and one per wallet after it.

    Every request counts against its address's `per_address` bucket; sign-in (/v1/auth/*, provider
    challenge and register), deposit (/v1/deposits*) and health (/healthz) requests also count against
    their route class's bucket of the address; completions also against the paying wallet's bucket.
    Buckets are kept per gateway replica and expire by time only.
    """

    per_address: RateLimit = Field(
        default_factory=lambda: RateLimit(requests=6_000, window_s=60),
        description="Every request of one client address (an IPv6 address counts by its /64).",
    )
    per_wallet: RateLimit = Field(
        default_factory=lambda: RateLimit(requests=3_000, window_s=60),
        description="Completion requests of one signed-in wallet, whichever key or address it uses.",
    )
    auth: RateLimit = Field(
        default_factory=lambda: RateLimit(requests=60, window_s=60),
        description="Sign-in requests (wallet and provider challenge/verify/register) of one address.",
    )
    deposits: RateLimit = Field(
        default_factory=lambda: RateLimit(requests=60, window_s=60),
        description="Deposit requests (/v1/deposits, /v1/deposits/info) of one address.",
    )
    health: RateLimit = Field(
        default_factory=lambda: RateLimit(requests=120, window_s=60), description="/healthz requests of one address."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Addresses or CIDRs of reverse proxies whose X-Forwarded-For names the client; empty: the"
        " peer address is the client (Serve's own proxy already believes X-Forwarded-For from 127.0.0.1).",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {entry!r} is not an address or CIDR") from exc
        return value

    @classmethod
    def unlimited(cls) -> "RateLimitsSection":
        """No limit at all (in-process gateways of tests and tools)."""
        off = {"requests": 0}
        return cls(per_address=off, per_wallet=off, auth=off, deposits=off, health=off)  # type: ignore[arg-type]
