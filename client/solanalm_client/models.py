"""Typed results of the SDK: frozen dataclasses built from the gateway's JSON (unknown fields ignored).

Amounts are integers in base units of the settlement asset (lamports for SOL, else the mint's smallest unit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A freshly issued API key (sign-in); `secret` is shown once."""

    id: str
    wallet: str
    secret: str = field(repr=False)
    created_at: float | None = None
    expires_at: float | None = None  # Unix seconds; None: the key does not expire

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ApiKey:
        return cls(
            str(body["id"]),
            str(body["wallet"]),
            str(body["api_key"]),
            _opt_float(body.get("created_at")),
            _opt_float(body.get("expires_at")),
        )


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One of the caller's API keys, as GET /v1/auth/keys lists it (no secret)."""

    id: str
    wallet: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> KeyInfo:
        return cls(
            str(body["id"]),
            str(body["wallet"]),
            float(body["created_at"]),
            _opt_float(body.get("expires_at")),
            _opt_float(body.get("revoked_at")),
        )


@dataclass(frozen=True, slots=True)
class Balance:
    wallet: str
    available: int
    held: int
    unpaid_earnings: int
    asset: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Balance:
        return cls(
            str(body["wallet"]),
            int(body["available"]),
            int(body["held"]),
            int(body["unpaid_earnings"]),
            str(body["asset"]),
        )


@dataclass(frozen=True, slots=True)
class ShareLine:
    """One line of a request's split: role provider | proxy | network (the commission) | withheld."""

    wallet: str
    role: str
    layers_served: int
    amount: int


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a request cost and who was paid; `settled` once every payee's share is paid on chain."""

    settlement_id: str
    request_id: str
    payer: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    price_prompt_per_1k: int
    price_completion_per_1k: int
    cost: int
    shares: tuple[ShareLine, ...]
    created_at: float
    settled: bool
    signatures: tuple[str, ...]

    @property
    def provider_shares(self) -> dict[str, int]:
        """Amount per provider wallet."""
        out: dict[str, int] = {}
        for share in self.shares:
            if share.role == "provider":
                out[share.wallet] = out.get(share.wallet, 0) + share.amount
        return out

    @property
    def commission(self) -> int:
        """The network's commission on this request."""
        return sum(s.amount for s in self.shares if s.role == "network")

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Receipt:
        shares = tuple(
            ShareLine(str(s["wallet"]), str(s["role"]), int(s["layers_served"]), int(s["amount"]))
            for s in body.get("shares", ())
        )
        return cls(
            str(body["settlement_id"]),
            str(body["request_id"]),
            str(body["payer"]),
            str(body["model"]),
            int(body["prompt_tokens"]),
            int(body["completion_tokens"]),
            int(body["price_prompt_per_1k"]),
            int(body["price_completion_per_1k"]),
            int(body["cost"]),
            shares,
            float(body["created_at"]),
            bool(body["settled"]),
            tuple(str(s) for s in body.get("signatures", ())),
        )


@dataclass(frozen=True, slots=True)
class DepositInfo:
    """Where to deposit: the treasury, the asset (mint None: SOL), a recent blockhash, the chain."""

    treasury: str
    mint: str | None
    decimals: int
    blockhash: str
    chain: str

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> DepositInfo:
        return cls(
            str(body["treasury"]),
            None if body.get("mint") is None else str(body["mint"]),
            int(body["decimals"]),
            str(body["blockhash"]),
            str(body["chain"]),
        )


@dataclass(frozen=True, slots=True)
class Deposit:
    """A credited deposit; `newly_credited` False when that signature had been credited before."""

    signature: str
    wallet: str
    amount: int
    newly_credited: bool

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Deposit:
        return cls(str(body["signature"]), str(body["wallet"]), int(body["amount"]), bool(body["newly_credited"]))


@dataclass(frozen=True, slots=True)
class Payout:
    """One payout line of the caller: its amount in a batch, the batch's state and its transaction."""

    batch_id: str
    wallet: str
    amount: int
    state: str  # created | signed | sent | confirmed | failed
    signature: str | None
    created_at: float
    updated_at: float

    @property
    def confirmed(self) -> bool:
        return self.state == "confirmed"

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Payout:
        return cls(
            str(body["batch_id"]),
            str(body["wallet"]),
            int(body["amount"]),
            str(body["state"]),
            None if body.get("signature") is None else str(body["signature"]),
            float(body["created_at"]),
            float(body["updated_at"]),
        )


@dataclass(frozen=True, slots=True)
class Earnings:
    """A provider's money: unpaid (not yet in a batch), in flight (open batches) and paid (confirmed)."""

    wallet: str
    unpaid: int
    in_flight: int
    paid: int
    payouts: tuple[Payout, ...]


@dataclass(frozen=True, slots=True)
class ProviderNode:
    """A node of the network (GET /v1/network/nodes): who it pays, its health and what it serves."""

    node_id: str
    wallet: str
    kind: str
    health: str
    endpoint: str
    models: tuple[str, ...]
    verified: bool
    last_seen: float
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ProviderNode:
        return cls(
            str(body.get("node_id", "")),
            str(body.get("wallet", "")),
            str(body.get("kind", "")),
            str(body.get("health", "")),
            str(body.get("endpoint", "")),
            tuple(str(m) for m in body.get("models", ()) or ()),
            bool(body.get("verified", False)),
            float(body.get("last_seen", 0.0) or 0.0),
            dict(body),
        )


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """Is `wallet` registered? Its nodes, as the gateway's registry lists them."""

    wallet: str
    nodes: tuple[ProviderNode, ...]

    @property
    def registered(self) -> bool:
        return bool(self.nodes)

    @property
    def alive(self) -> bool:
        return any(n.health == "alive" for n in self.nodes)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """The answer and the id of its settlement (None in open mode): read it with `client.receipt(id)`."""

    text: str
    settlement_id: str | None
    request_id: str | None
    model: str
    finish_reason: str | None
    usage: Usage | None
    response: Any = field(repr=False, compare=False, default=None)  # the openai ChatCompletion / Completion


__all__ = [
    "ApiKey",
    "Balance",
    "Deposit",
    "DepositInfo",
    "Earnings",
    "InferenceResult",
    "KeyInfo",
    "Payout",
    "ProviderNode",
    "ProviderStatus",
    "Receipt",
    "ShareLine",
    "Usage",
]
