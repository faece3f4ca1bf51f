"""Typed messages between the serving gateway (or the CLI) and the payments actor.

The gateway never imports payments internals: it calls the named actor (see `payments.client`) with
these dataclasses and gets these dataclasses back. Amounts are integers in base units of the
settlement asset (lamports, or the SPL mint's smallest unit).

Request lifecycle, as the gateway sees it:
1. `authenticate(api_key) -> WalletIdentity`         (401 on a bad key; skipped in open mode)
2. `place_hold(HoldRequest) -> Hold`                 (402 when the balance does not cover it)
3a. `report_usage(UsageReport) -> SettlementRecord`  (completed; its id goes in the response)
3b. `release_hold(ReleaseHold) -> None`              (the request failed or was rejected: no charge)
    `sweep_holds() -> HoldSweep`                     (the actor's loop: holds no request will close)
3c. `withhold_payout(WithholdPayout) -> WithheldPayout` (a later audit failed: providers unpaid)
4. `get_receipt(ReceiptQuery) -> Receipt`            (403 unless the reader is the payer or a payee)
"""

import inspect
from dataclasses import dataclass, field
from typing import Protocol

SETTLEMENT_HEADER = "x-solanalm-settlement-id"


@dataclass(frozen=True, slots=True)
class WalletIdentity:
    """Who is calling: a wallet (base58) and the API key id it used (None in open mode)."""

    wallet: str
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """Reserve the most a request can cost: (prompt_tokens + max_tokens) at the model's price."""

    request_id: str
    payer: str
    model: str
    max_tokens: int
    prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Hold:
    """A placed hold; released down to the actual cost when usage is reported."""

    request_id: str
    payer: str
    amount: int
    balance_after: int


@dataclass(frozen=True, slots=True)
class HoldSweep:
    """Holds open for longer than any request lives, released to their payers (`amount` in all)."""

    request_ids: tuple[str, ...]
    amount: int


@dataclass(frozen=True, slots=True)
class ProviderShare:
    """One provider's part of a request: the wallet paid and how many layers it computed."""

    wallet: str
    layers_served: int


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Final usage of a completed request; the payout is split by layers_served."""

    request_id: str
    payer: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    providers: tuple[ProviderShare, ...]
    proxy_wallet: str | None = None
    proxy_commission_bps: int | None = None  # the proxy's own rate (catalogue); None: the configured one


@dataclass(frozen=True, slots=True)
class TrainingReward:
    """A federated-training round's reward to one wallet (sent by train_jobs as a plain dict).

    `amount` is in base units of the settlement asset (train_jobs calls it amount_lamports).
    """

    job: str
    round: int
    wallet: str
    amount: int
    examples: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseHold:
    """The request failed or was rejected by verification: release the hold, charge nothing."""

    request_id: str
    reason: str = "failed"


@dataclass(frozen=True, slots=True)
class WithholdPayout:
    """An audit of a settled request failed: withhold these provider wallets' payout for it."""

    request_id: str
    wallets: tuple[str, ...]
    reason: str = "verification failed"


@dataclass(frozen=True, slots=True)
class WithheldPayout:
    """What was withheld (`amount` base units from `wallets`); `too_late`: shares already in a batch."""

    request_id: str
    settlement_id: str
    amount: int
    wallets: tuple[str, ...]
    too_late: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ShareLine:
    """One line of a settlement's split."""

    wallet: str
    role: str  # "provider" | "network" | "proxy" | "withheld" (a provider share withheld after a failed check)
    layers_served: int
    amount: int


@dataclass(frozen=True, slots=True)
class SettlementRecord:
    """The durable per-request record (returned once it is committed to the ledger)."""

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


@dataclass(frozen=True, slots=True)
class ReceiptQuery:
    """Read a receipt as `reader` (the payer or one of the paid providers)."""

    settlement_id: str
    reader: str


@dataclass(frozen=True, slots=True)
class Receipt:
    """A settlement record plus its on-chain status."""

    record: SettlementRecord
    settled: bool
    signatures: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Balance:
    """A wallet's spendable balance, held amount and (as a provider) unpaid earnings."""

    wallet: str
    available: int
    held: int
    unpaid_earnings: int
    asset: str


@dataclass(frozen=True, slots=True)
class DepositRequest:
    """Credit a deposit: the signature of a transfer to the treasury."""

    signature: str


@dataclass(frozen=True, slots=True)
class DepositInfo:
    """Where to deposit: the treasury, the asset (mint None for SOL) and a recent blockhash."""

    treasury: str
    mint: str | None
    decimals: int
    blockhash: str
    chain: str


@dataclass(frozen=True, slots=True)
class Deposit:
    """A credited deposit (each signature is credited once)."""

    signature: str
    wallet: str
    amount: int
    newly_credited: bool


@dataclass(frozen=True, slots=True)
class Challenge:
    """A Sign-In-With-Solana message for the wallet to sign."""

    message: str
    nonce: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class SignIn:
    """A signed SIWS message (signature base58); `ttl_s` asks for a key shorter-lived than the default."""

    message: str
    signature: str
    ttl_s: int | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A freshly issued API key; `secret` is shown once and stored only hashed. Times are Unix seconds."""

    key_id: str
    wallet: str
    secret: str
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """One of a wallet's API keys as listed to its owner (never the secret)."""

    key_id: str
    wallet: str
    created_at: float
    expires_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class UsageLine:
    """One settled request of a payer, as its usage history lists it (the receipt is at its settlement id)."""

    settlement_id: str
    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    created_at: float


@dataclass(frozen=True, slots=True)
class PayoutStatus:
    """One payout line of a wallet: its amount in a settlement batch, the batch's state and transaction."""

    batch_id: str
    wallet: str
    amount: int
    state: str  # created | signed | sent | confirmed | failed
    signature: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class BatchReport:
    """Outcome of one settle pass."""

    batches_confirmed: int
    payouts_confirmed: int
    amount_paid: int
    pending_batches: int
    held_wallets: int


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """Result of the double-entry and chain checks; `ok` only when every check passed."""

    ok: bool
    checks: dict[str, bool]
    details: dict[str, int]


class PaymentsAPI(Protocol):
    """What the gateway holds: `payments.client.PaymentsClient` (the actor's workers).

    The one list of payments calls: the actor serves each of them from its service, the client and the
    tests' in-process fake forward them by name (`PAYMENTS_METHODS`), so a call added here is added everywhere.
    """

    async def authenticate(self, api_key: str | None) -> WalletIdentity: ...
    async def place_hold(self, req: HoldRequest) -> Hold: ...
    async def report_usage(self, report: UsageReport) -> SettlementRecord: ...
    async def release_hold(self, release: ReleaseHold) -> None: ...
    async def sweep_holds(self, max_age_s: float | None = None) -> HoldSweep: ...  # None: payments.hold_max_age_s
    async def withhold_payout(self, req: WithholdPayout) -> WithheldPayout: ...
    async def get_receipt(self, query: ReceiptQuery) -> Receipt: ...
    async def balance(self, wallet: str) -> Balance: ...
    async def deposit(self, req: DepositRequest) -> Deposit: ...
    async def deposit_info(self) -> DepositInfo: ...
    async def challenge(self, wallet: str) -> Challenge: ...
    async def verify(self, sign_in: SignIn) -> ApiKey: ...
    async def revoke_key(self, key_id: str, wallet: str) -> None: ...
    async def list_keys(self, wallet: str) -> list[ApiKeyInfo]: ...
    async def payouts(self, wallet: str) -> list[PayoutStatus]: ...
    async def usage(self, wallet: str) -> list[UsageLine]: ...  # the payer's settled requests, newest first
    async def settle(self) -> BatchReport: ...
    async def reconcile(self) -> ReconcileReport: ...
    async def pending(self) -> dict[str, object]: ...
    async def submit_transaction(self, tx_bytes: bytes) -> str: ...
    async def faucet(self, wallet: str, amount: int) -> None: ...  # litesvm backend only
    async def fund_training_rewards(self, ref: str, amount: int) -> int: ...  # operator: once per `ref`


PAYMENTS_METHODS: frozenset[str] = frozenset(
    name for name, member in vars(PaymentsAPI).items() if inspect.iscoroutinefunction(member)
)
