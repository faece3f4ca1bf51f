"""Per-request metering through the payments actor: authenticate, hold, then settle or release.

The gateway holds the most a request can cost before it starts (402 when the balance is short) and,
when the replica reports the request finished, records its settlement: who paid, which provider wallets
served how many layers. A request whose client went away is charged for its prompt and the completion
tokens produced for it until then (`abandoned`); one that failed on our side has its hold released.
Either runs in a task of its own (`HoldCloser`), which the request's cancellation cannot reach.
"""

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

from cluster.observability.logs import REQUEST_ID
from payments.errors import PaymentError
from payments.http import bearer_key
from payments.protocol import (
    HoldRequest,
    PaymentsAPI,
    ProviderShare,
    ReleaseHold,
    UsageReport,
    WalletIdentity,
)
from serve_apps.gateway.errors import OpenAIError
from serve_apps.protocol import Accepted, EmbedRequest, Finished, GenerateRequest, ProviderWork

Metered = GenerateRequest | EmbedRequest  # what is held for and settled (embeddings: prompt tokens only)

logger = logging.getLogger(__name__)

TEMPLATE_TOKENS = 64  # chat-template tokens around the messages, counted into the hold


class Metering:
    """What the gateway does with payments; with no payments client every call is a no-op."""

    def __init__(self, payments: PaymentsAPI | None, operator_wallet: str | None = None) -> None:
        self.payments = payments
        self._operator_wallet = operator_wallet
        self._closing: set[asyncio.Task[str | None]] = set()  # settlements and releases under way

    def closer(self, request: Metered, payer: str | None) -> "HoldCloser":
        """What closes an admitted request's hold, once."""
        return HoldCloser(self, request, payer)

    async def drain(self) -> None:
        """Wait for the settlements and releases under way (tests, shutdown)."""
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, str | None]) -> asyncio.Task[str | None]:
        # A fresh context: Ray attributes an actor call to the task whose context makes it, and Serve cancels
        # a cancelled request's calls with it (the settlement's included). The loop keeps only weak
        # references to tasks: the set keeps each one until it ends.
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._closing.add(task)
        task.add_done_callback(self._closed)
        return task

    def _closed(self, task: asyncio.Task[str | None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:  # also seen by any awaiter
            logger.warning("closing a hold failed: %s", error)

    @property
    def enabled(self) -> bool:
        return self.payments is not None

    async def authenticate(self, authorization: str | None) -> WalletIdentity | None:
        """Who is calling (401 as an OpenAI error); None when payments are off."""
        if self.payments is None:
            return None
        try:
            return await self.payments.authenticate(bearer_key(authorization))
        except PaymentError as exc:
            raise _as_openai(exc) from None

    async def admit(self, identity: WalletIdentity | None, request: Metered, max_tokens: int) -> str | None:
        """The paying wallet, after a hold for the request's largest cost (402 as an OpenAI error)."""
        if self.payments is None or identity is None:
            return None
        try:
            hold = HoldRequest(request.request_id, identity.wallet, request.model, max_tokens, prompt_bound(request))
            await self.payments.place_hold(hold)
        except PaymentError as exc:
            raise _as_openai(exc) from None
        return identity.wallet

    async def settle(self, request: Metered, payer: str | None, finished: Finished) -> str | None:
        """Record the finished request's settlement; its id goes back to the client."""
        if self.payments is None or payer is None:
            return None
        # A replica that named no payees (none before it accepted): the operator's, for all the work.
        works = finished.providers or (ProviderWork(None, 1),)
        providers = tuple([ProviderShare(work.wallet or await self._operator(), work.layers) for work in works])
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


class HoldCloser:
    """Closes one admitted request's hold exactly once: settled for what it used, or released.

    The settlement or release runs in a task of its own, kept by the Metering until it ends: a client
    that goes away cancels the route's task (or closes its stream generator), and that cannot stop a
    settlement half-way or leave the hold open. A caller that needs the settlement id awaits the task
    through `asyncio.shield`. Calls after the first return the first one's task.
    """

    def __init__(self, metering: Metering, request: Metered, payer: str | None) -> None:
        self._metering, self._request, self._payer = metering, request, payer
        self._task: asyncio.Task[str | None] | None = None

    @property
    def closed(self) -> bool:
        return self._task is not None

    def settle(self, finished: Finished) -> asyncio.Task[str | None]:
        """Charge `finished`'s tokens (an `abandoned` request's made-up Finished too); the settlement id."""
        if self._task is None:
            self._task = self._metering._spawn(self._settled(finished))
        return self._task

    def release(self, reason: str) -> asyncio.Task[str | None]:
        """Charge nothing: the request failed on our side (or never ran)."""
        if self._task is None:
            self._task = self._metering._spawn(self._released(reason))
        return self._task

    async def _settled(self, finished: Finished) -> str | None:
        REQUEST_ID.set(self._request.request_id)  # the fresh context's log lines name the request too
        try:
            return await self._metering.settle(self._request, self._payer, finished)
        except OpenAIError:  # a payments error: settle released the hold
            raise
        except Exception:  # anything else must not leave the hold open until the sweep
            await self._metering.release(self._request.request_id, "settlement failed")
            raise

    async def _released(self, reason: str) -> str | None:
        REQUEST_ID.set(self._request.request_id)
        await self._metering.release(self._request.request_id, reason)
        return None


def abandoned(accepted: Accepted, completion_tokens: int) -> Finished:
    """What a request its client left used: the prompt and the completion tokens produced for it (streamed:
    handed to the client), paid to the payees the replica named when it accepted the request."""
    return Finished(
        "abort", accepted.prompt_tokens, completion_tokens, providers=accepted.providers, proxy=accepted.proxy
    )


def prompt_bound(request: Metered) -> int:
    """An upper bound of the prompt's tokens: a byte-level BPE token is at least one byte."""
    if isinstance(request, EmbedRequest):  # a text as a completion prompt; token ids as given
        return sum(len(item.encode()) + 1 if isinstance(item, str) else len(item) for item in request.inputs)
    if request.prompt is not None:
        return len(request.prompt.encode()) + TEMPLATE_TOKENS
    return sum(len(turn.content.encode()) + 8 for turn in request.messages or ()) + TEMPLATE_TOKENS


def _as_openai(exc: PaymentError) -> OpenAIError:
    return OpenAIError(exc.status_code, exc.message, code=exc.code)
