"""Per-request metering through the payments actor: authenticate, hold, then settle or release.

The gateway holds the most a request can cost before it starts (402 when the balance is short) and,
when the replica reports the request finished, records its settlement: who paid, which provider wallets
served how many layers. A failed or abandoned request has its hold released and is not charged.
"""

import logging

from payments.errors import PaymentError
from payments.http import bearer_key
from payments.protocol import (
    HoldRequest,
    PaymentsAPI,
    ProviderShare,
    ReleaseHold,
    UsageReport,
)
from serve_apps.gateway.errors import OpenAIError
from serve_apps.protocol import Finished, GenerateRequest

logger = logging.getLogger(__name__)

TEMPLATE_TOKENS = 64  # chat-template tokens around the messages, counted into the hold


class Metering:
    """What the gateway does with payments; with no payments client every call is a no-op."""

    def __init__(self, payments: PaymentsAPI | None, operator_wallet: str | None = None) -> None:
        self.payments = payments
        self._operator_wallet = operator_wallet

    @property
    def enabled(self) -> bool:
        return self.payments is not None

    async def admit(self, authorization: str | None, request: GenerateRequest, max_tokens: int) -> str | None:
        """The paying wallet, after a hold for the request's largest cost (401/402 as OpenAI errors)."""
        if self.payments is None:
            return None
        try:
            identity = await self.payments.authenticate(bearer_key(authorization))
            hold = HoldRequest(request.request_id, identity.wallet, request.model, max_tokens, prompt_bound(request))
            await self.payments.place_hold(hold)
        except PaymentError as exc:
            raise _as_openai(exc) from None
        return identity.wallet

    async def settle(self, request: GenerateRequest, payer: str | None, finished: Finished) -> str | None:
        """Record the finished request's settlement; its id goes back to the client."""
        if self.payments is None or payer is None:
            return None
        providers = tuple(
            [ProviderShare(work.wallet or await self._operator(), work.layers) for work in finished.providers]
        )
        proxy = finished.proxy  # a proxy node served it: its wallet earns the proxy commission
        report = UsageReport(
            request.request_id,
            payer,
            request.model,
            finished.prompt_tokens,
            finished.completion_tokens,
            providers,
            proxy_wallet=(proxy.wallet or await self._operator()) if proxy is not None else None,
            proxy_commission_bps=proxy.commission_bps if proxy is not None else None,
        )
        try:
            record = await self.payments.report_usage(report)
        except PaymentError as exc:
            await self.release(request.request_id, "settlement failed")
            raise _as_openai(exc) from None
        return record.settlement_id

    async def release(self, request_id: str, reason: str) -> None:
        """Drop a request's hold (failed, rejected or abandoned): nothing is charged."""
        if self.payments is None:
            return
        try:
            await self.payments.release_hold(ReleaseHold(request_id, reason))
        except PaymentError:
            logger.exception("could not release the hold of %s; reconcile will find it", request_id)

    async def _operator(self) -> str:
        # Work done on nodes without a provider wallet label is the operator's: its configured wallet,
        # else the treasury itself (the embedded single-machine default).
        if self._operator_wallet is None and self.payments is not None:
            self._operator_wallet = (await self.payments.deposit_info()).treasury
        return self._operator_wallet or ""


def prompt_bound(request: GenerateRequest) -> int:
    """An upper bound of the prompt's tokens: a byte-level BPE token is at least one byte."""
    if request.prompt is not None:
        return len(request.prompt.encode()) + TEMPLATE_TOKENS
    return sum(len(turn.content.encode()) + 8 for turn in request.messages or ()) + TEMPLATE_TOKENS


def _as_openai(exc: PaymentError) -> OpenAIError:
    return OpenAIError(exc.status_code, exc.message, code=exc.code)
