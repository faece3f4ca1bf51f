"""How other packages reach payments: the named detached actor, behind a typed async client.

    client = get_payments_client(settings.payments)      # or start_payments_actor(...) once
    who = await client.authenticate(api_key)
    hold = await client.place_hold(HoldRequest(...))     # raises InsufficientBalance -> HTTP 402

Errors raised in the actor come back as the same PaymentError subclass; a dead or slow actor becomes
PaymentsUnavailable (HTTP 503). Every call has the section's timeout.
"""

import asyncio
import logging
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.config.payments import PaymentsSection
from payments.actor import PaymentsActor
from payments.errors import PaymentError
from payments.protocol import (
    ApiKey,
    ApiKeyInfo,
    Balance,
    BatchReport,
    Challenge,
    Deposit,
    DepositInfo,
    DepositRequest,
    Hold,
    HoldRequest,
    HoldSweep,
    PayoutStatus,
    Receipt,
    ReceiptQuery,
    ReconcileReport,
    ReleaseHold,
    SettlementRecord,
    SignIn,
    UsageReport,
    WalletIdentity,
    WithheldPayout,
    WithholdPayout,
)
from payments.service import PaymentsService
from payments.settlement import CrashHook

logger = logging.getLogger(__name__)


class PaymentsUnavailable(PaymentError):
    """The payments actor is dead, restarting or too slow (HTTP 503)."""

    status_code = 503
    error_type = "api_error"
    code = "payments_unavailable"


def start_payments_actor(
    section: PaymentsSection,
    *,
    namespace: str | None = None,
    settle_loop: bool = True,
    crash_hook: CrashHook | None = None,
) -> Any:
    """Start (or get) the named detached payments actor; restarted by Ray if its process dies."""
    remote_cls = ray.remote(PaymentsActor).options(  # type: ignore[attr-defined]
        name=section.actor_name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=1000,
        num_cpus=0,
        # The ledger lives on the head's disk (state_dir): a restarted actor must come back on the head,
        # never on a provider node, where it would open an empty ledger.
        resources={"node:__internal_head__": 0.001},
    )
    handle: Any = remote_cls.remote(section, settle_loop, crash_hook)
    ray.get(handle.ready.remote(), timeout=max(section.actor_call_timeout_s, 60.0))
    return handle


def get_payments_client(section: PaymentsSection, *, namespace: str | None = None) -> "PaymentsClient":
    """A client of the already running named actor."""
    return PaymentsClient(ray.get_actor(section.actor_name, namespace=namespace), section.actor_call_timeout_s)


class PaymentsClient:
    """PaymentsAPI over the actor handle, with a timeout and error translation on every call."""

    def __init__(self, handle: Any, timeout_s: float) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(self.handle, method).remote(*args), self.timeout_s)
        except RayTaskError as exc:
            if isinstance(exc.cause, PaymentError):
                raise exc.cause from None
            raise
        except (RayActorError, GetTimeoutError, TimeoutError) as exc:
            raise PaymentsUnavailable(f"payments actor call {method} failed: {exc}") from exc

    async def authenticate(self, api_key: str | None) -> WalletIdentity:
        return await self._call("authenticate", api_key)

    async def place_hold(self, req: HoldRequest) -> Hold:
        return await self._call("place_hold", req)

    async def report_usage(self, report: UsageReport) -> SettlementRecord:
        return await self._call("report_usage", report)

    async def release_hold(self, release: ReleaseHold) -> None:
        await self._call("release_hold", release)

    async def sweep_holds(self, max_age_s: float | None = None) -> HoldSweep:
        return await self._call("sweep_holds", max_age_s)

    async def fund_training_rewards(self, ref: str, amount: int) -> int:
        return int(await self._call("fund_training_rewards", ref, amount))

    async def withhold_payout(self, req: WithholdPayout) -> WithheldPayout:
        return await self._call("withhold_payout", req)

    async def get_receipt(self, query: ReceiptQuery) -> Receipt:
        return await self._call("get_receipt", query)

    async def balance(self, wallet: str) -> Balance:
        return await self._call("balance", wallet)

    async def deposit(self, req: DepositRequest) -> Deposit:
        return await self._call("deposit", req)

    async def challenge(self, wallet: str) -> Challenge:
        return await self._call("challenge", wallet)

    async def verify(self, sign_in: SignIn) -> ApiKey:
        return await self._call("verify", sign_in)

    async def revoke_key(self, key_id: str, wallet: str) -> None:
        await self._call("revoke_key", key_id, wallet)

    async def list_keys(self, wallet: str) -> list[ApiKeyInfo]:
        return await self._call("list_keys", wallet)

    async def payouts(self, wallet: str) -> list[PayoutStatus]:
        return await self._call("payouts", wallet)

    async def settle(self) -> BatchReport:
        return await self._call("settle")

    async def reconcile(self) -> ReconcileReport:
        return await self._call("reconcile")

    async def pending(self) -> dict[str, object]:
        return await self._call("pending")

    async def deposit_info(self) -> DepositInfo:
        return await self._call("deposit_info")

    async def submit_transaction(self, tx_bytes: bytes) -> str:
        return await self._call("submit_transaction", tx_bytes)

    async def faucet(self, wallet: str, amount: int) -> None:
        await self._call("faucet", wallet, amount)


class LocalPaymentsClient:
    """PaymentsAPI over an in-process PaymentsService (embedded mode, tests, the CLI)."""

    def __init__(self, service: PaymentsService) -> None:
        self.service = service

    async def authenticate(self, api_key: str | None) -> WalletIdentity:
        return self.service.authenticate(api_key)

    async def place_hold(self, req: HoldRequest) -> Hold:
        return self.service.place_hold(req)

    async def report_usage(self, report: UsageReport) -> SettlementRecord:
        return self.service.report_usage(report)

    async def release_hold(self, release: ReleaseHold) -> None:
        self.service.release_hold(release)

    async def sweep_holds(self, max_age_s: float | None = None) -> HoldSweep:
        return self.service.sweep_holds(max_age_s)

    async def withhold_payout(self, req: WithholdPayout) -> WithheldPayout:
        return self.service.withhold_payout(req)

    async def get_receipt(self, query: ReceiptQuery) -> Receipt:
        return self.service.get_receipt(query)

    async def balance(self, wallet: str) -> Balance:
        return self.service.balance(wallet)

    async def deposit(self, req: DepositRequest) -> Deposit:
        return await self.service.deposit(req)

    async def challenge(self, wallet: str) -> Challenge:
        return self.service.challenge(wallet)

    async def verify(self, sign_in: SignIn) -> ApiKey:
        return self.service.verify(sign_in)

    async def revoke_key(self, key_id: str, wallet: str) -> None:
        self.service.revoke_key(key_id, wallet)

    async def list_keys(self, wallet: str) -> list[ApiKeyInfo]:
        return self.service.list_keys(wallet)

    async def payouts(self, wallet: str) -> list[PayoutStatus]:
        return self.service.payouts(wallet)

    async def settle(self) -> BatchReport:
        return await self.service.settle()

    async def reconcile(self) -> ReconcileReport:
        return await self.service.reconcile()

    async def pending(self) -> dict[str, object]:
        return self.service.pending()

    async def deposit_info(self) -> DepositInfo:
        return await self.service.deposit_info()

    async def submit_transaction(self, tx_bytes: bytes) -> str:
        return await self.service.submit_transaction(tx_bytes)

    async def faucet(self, wallet: str, amount: int) -> None:
        await self.service.faucet(wallet, amount)
