"""Payments settings section (owned by the payments package's maintainers).

Amounts are in base units of the settlement asset: lamports for SOL, the mint's smallest unit for an
SPL token. Prices are per 1,000 tokens so small models can still have integer prices.
"""

from ipaddress import ip_address
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from cluster.config.base import Section

ChainBackendKind = Literal["litesvm", "rpc"]
SettlementAsset = Literal["sol", "spl"]
Commitment = Literal["processed", "confirmed", "finalized"]


class ModelPrice(Section):
    """Price of one model, in base units per 1,000 tokens."""

    prompt_per_1k: int = Field(default=1_000, ge=0, le=10**15, description="Base units per 1k prompt tokens.")
    completion_per_1k: int = Field(default=2_000, ge=0, le=10**15, description="Base units per 1k completion tokens.")


class PaymentsSection(Section):
    """Ledger, pricing, wallet sign-in and Solana settlement."""

    enabled: bool = Field(default=False, description="Meter and settle requests through the payments actor.")
    open_mode: bool = Field(default=False, description="Serve without authentication or charging (embedded demo only).")
    operator_wallet: str | None = Field(
        default=None,
        description="Wallet credited for stages on nodes without a provider wallet label (the operator's own"
        " machines); None: the network treasury.",
    )
    actor_name: str = Field(default="solanalm-payments", min_length=1, description="Named detached Ray actor.")
    actor_call_timeout_s: float = Field(default=10.0, gt=0, le=600, description="Timeout of one actor call.")

    # Ledger
    database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL (postgresql+psycopg://... for several gateways); None: SQLite in state_dir.",
    )
    state_dir: Path = Field(
        default=Path("~/.local/state/solanalm/payments"),
        validate_default=True,
        description="SQLite ledger, LiteSVM chain snapshot and generated treasury keypair.",
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL",
        description="SQLite fsync: FULL survives power loss, NORMAL (WAL) only process crashes.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Payments actors (each with its own engine on the shared ledger; gateways spread calls over"
        " them). More than one needs PostgreSQL (database_url): SQLite is one file on one machine, one writer.",
    )
    settlement_lease_s: float = Field(
        default=60.0,
        ge=1,
        le=3_600,
        description="Lifetime of the settlement lease, renewed before every step of a settle pass: one worker"
        " settles at a time; another takes over this long after its holder stopped renewing (died).",
    )
    group_commit_max: int = Field(
        default=256,
        ge=1,
        le=10_000,
        description="Most settlement records committed in one DB transaction.",
    )

    # Pricing and commissions
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="Per-model prices; models not listed use default_price."
    )
    default_price: ModelPrice = Field(default_factory=ModelPrice, description="Price of unlisted models.")
    network_commission_bps: int = Field(
        default=500,
        ge=0,
        le=5_000,
        description="Network commission in basis points of each request's cost.",
    )
    proxy_commission_bps: int = Field(
        default=100,
        ge=0,
        le=5_000,
        description="Proxy commission in basis points, when a proxy served it.",
    )

    # Chain
    chain_backend: ChainBackendKind = Field(
        default="litesvm",
        description="litesvm: in-process runtime (embedded); rpc: JSON-RPC validator.",
    )
    rpc_url: str = Field(default="http://127.0.0.1:8899", description="JSON-RPC endpoint (rpc backend).")
    commitment: Commitment = Field(default="confirmed", description="Commitment for reads and confirmations.")
    rpc_timeout_s: float = Field(default=10.0, gt=0, le=300, description="Timeout of one JSON-RPC call.")
    treasury_keypair_path: Path | None = Field(
        default=None,
        description="Solana CLI JSON keypair of the treasury; None: generated in state_dir.",
    )
    asset: SettlementAsset = Field(default="spl", description="Settle in SOL or in an SPL token.")
    mint: str | None = Field(
        default=None,
        description="SPL token mint (base58); None on litesvm: a mint is created at start.",
    )
    mint_decimals: int = Field(default=6, ge=0, le=18, description="Decimals of the mint created on litesvm.")

    # Settlement
    batch_max_transfers: int = Field(
        default=19,
        ge=1,
        le=256,
        description="Most payouts per transaction (also bounded by 1232 bytes); ~50 fit with v0.",
    )
    use_versioned_tx: bool = Field(
        default=False,
        description="Send v0 payout transactions with treasury-owned address lookup tables.",
    )
    compute_unit_limit: int = Field(default=200_000, ge=1_000, le=1_400_000, description="CU limit per batch.")
    compute_unit_price_micro_lamports: int = Field(
        default=1_000, ge=0, le=10**9, description="Priority fee per CU, micro-lamports."
    )
    min_payout: int = Field(default=1, ge=1, le=10**15, description="Smallest payout sent, base units.")
    settle_interval_s: float = Field(default=30.0, gt=0, le=86_400, description="Period of the settle loop.")
    resign_margin_blocks: int = Field(
        default=64,
        ge=0,
        le=150,  # payments.chain.base.RESIGN_MARGIN_MAX_BLOCKS
        description="Blocks the finalized block height must pass a batch's last valid block height by before"
        " an unknown batch is re-signed (covers RPC nodes that lag behind a load balancer).",
    )
    resign_history_limit: int = Field(
        default=5_000,
        ge=1_000,
        le=100_000,
        description="Treasury signatures searched (getSignaturesForAddress) for a batch's memo before re-signing.",
    )
    quarantine_backoff_s: float = Field(
        default=3_600.0,
        ge=1,
        le=30 * 86_400,
        description="Seconds a payee whose transfer failed on chain is left out of batches; doubles per failure.",
    )
    quarantine_backoff_max_s: float = Field(
        default=7 * 86_400.0,
        ge=1,
        le=365 * 86_400,
        description="Longest wait between retries of a quarantined payee, seconds.",
    )

    # Sign-in
    siws_domain: str = Field(
        default="localhost",
        min_length=1,
        max_length=253,
        description="Domain a SIWS message must name: the host clients sign in on. A paid deployment refuses"
        " a loopback name (localhost, 127.0.0.1, ::1) unless siws_allow_local_domain is set.",
    )
    siws_allow_local_domain: bool = Field(
        default=False,
        description="Accept a loopback siws_domain with payments enabled outside open mode (local tests only).",
    )
    nonce_ttl_s: int = Field(default=300, ge=10, le=86_400, description="Lifetime of a sign-in nonce.")
    message_max_age_s: int = Field(
        default=600,
        ge=10,
        le=86_400,
        description="Longest accepted Expiration Time minus Issued At.",
    )
    api_key_ttl_s: int = Field(
        default=30 * 86_400,
        ge=60,
        le=400 * 86_400,
        description="Lifetime of an API key from its sign-in; a client may ask for less (verify's ttl_s).",
    )

    @model_validator(mode="after")
    def _several_workers_need_postgres(self) -> "PaymentsSection":
        if self.workers > 1 and self.resolved_database_url().startswith("sqlite"):
            raise ValueError(
                f"payments.workers is {self.workers} but the ledger is SQLite, one file on one machine with one"
                " writer: set payments.database_url to a PostgreSQL URL (postgresql+psycopg://...) to run more"
                " than one payments worker, or keep payments.workers at 1"
            )
        return self

    def worker_actor_name(self, index: int) -> str:
        """The named actor of payments worker `index` (worker 0 keeps `actor_name`)."""
        if not 0 <= index < self.workers:
            raise ValueError(f"payments worker {index} out of range 0..{self.workers - 1}")
        return self.actor_name if index == 0 else f"{self.actor_name}-{index}"

    @property
    def chain_actor_name(self) -> str:
        """The named actor holding the one LiteSVM chain of a multi-worker litesvm deployment."""
        return f"{self.actor_name}-chain"

    @model_validator(mode="after")
    def _real_sign_in_domain(self) -> "PaymentsSection":
        # A wallet shows the domain it signs for; "localhost" matches any page served on the user's machine.
        if self.enabled and not self.open_mode and not self.siws_allow_local_domain and is_loopback(self.siws_domain):
            raise ValueError(
                f"payments.siws_domain is {self.siws_domain!r}, a loopback name: set it to the domain clients sign in"
                " on (or payments.siws_allow_local_domain: true for a local test deployment)"
            )
        return self

    # Holds
    hold_max_age_s: float = Field(
        default=1800.0,
        gt=0,
        le=7 * 86_400,
        description="A hold open this long is released by the sweep (no request lives that long); keep it above"
        " twice pipeline.request_timeout_s: a stream may wait that long for its first token and as long again to end.",
    )
    hold_sweep_interval_s: float = Field(
        default=60.0, gt=0, le=86_400, description="Period of the actor's sweep of holds older than hold_max_age_s."
    )

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    def price_for(self, model: str) -> ModelPrice:
        """The price of `model` (falls back to default_price)."""
        return self.prices.get(model, self.default_price)

    def resolved_database_url(self) -> str:
        """The ledger URL: the configured one, or a SQLite file in state_dir."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.state_dir / 'ledger.sqlite3'}"


def is_loopback(domain: str) -> bool:
    """localhost, *.localhost or a loopback address (with or without a port)."""
    host = domain.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False
