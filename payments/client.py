"""How other packages reach payments: the named detached actor, behind a typed async client.

    client = get_payments_client(settings.payments)      # or start_payments_actor(...) once
    who = await client.authenticate(api_key)
    hold = await client.place_hold(HoldRequest(...))     # raises InsufficientBalance -> HTTP 402

Errors raised in the actor come back as the same PaymentError subclass; a dead or slow actor becomes
PaymentsUnavailable (HTTP 503). Every call has the section's timeout. The client restates no call: each
`PaymentsAPI` method is forwarded by name (`PaymentsClient.__getattr__`).

With `payments.workers > 1` the client holds every worker's handle and spreads calls round-robin; a worker
whose actor died is skipped for `DEAD_WORKER_SKIP_S`, and a call that cannot have charged anyone twice
(reads, and the idempotent usage report and hold release) is retried once on the next worker.
"""

import asyncio
import itertools
import logging
import time
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from cluster.config.payments import PaymentsSection
from payments.actor import PaymentsActor
from payments.errors import PaymentError
from payments.forwarding import AsyncCall
from payments.protocol import PAYMENTS_METHODS
from payments.settlement import CrashHook

logger = logging.getLogger(__name__)
DEAD_WORKER_SKIP_S = 5.0  # a worker whose actor died is not called again for this long (Ray may restart it)
# Safe to run again on another worker after the first one died mid-call: reads, and calls the ledger makes
# idempotent (a usage report of a settled request returns its record; a released hold stays released).
RETRY_ON_ANOTHER_WORKER = frozenset(
    {
        "authenticate",
        "report_usage",
        "release_hold",
        "get_receipt",
        "balance",
        "list_keys",
        "payouts",
        "pending",
        "deposit_info",
        "deposit",
        "challenge",
        "settle",
        "reconcile",
    }
)


class PaymentsUnavailable(PaymentError):
    """The payments actor is dead, restarting or too slow (HTTP 503)."""

    status_code = 503
    code = "payments_unavailable"


def start_payments_actor(
    section: PaymentsSection,
    *,
    namespace: str | None = None,
    settle_loop: bool = True,
    crash_hook: CrashHook | None = None,
) -> Any:
    """Start (or get) the payments workers (named detached actors, restarted by Ray if their process dies);
    worker 0's handle."""
    handles = start_payments_workers(section, namespace=namespace, settle_loop=settle_loop, crash_hook=crash_hook)
    return handles[0]


def start_payments_workers(
    section: PaymentsSection,
    *,
    namespace: str | None = None,
    settle_loop: bool = True,
    crash_hook: CrashHook | None = None,
) -> list[Any]:
    """Start (or get) every payments worker (`payments.workers` named detached actors); their handles, worker 0
    first. Worker 0 is started and ready before the others, so it alone creates the schema and the treasury."""
    handles: list[Any] = []
    for index in range(section.workers):
        remote_cls = ray.remote(PaymentsActor).options(  # type: ignore[attr-defined]
            name=section.worker_actor_name(index),
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_concurrency=1000,
            num_cpus=0,
            # The ledger (SQLite) and LiteSVM snapshot live on the head's disk (state_dir): a restarted actor
            # must come back on the head, never on a provider node, where it would open an empty ledger.
            resources={"node:__internal_head__": 0.001},
        )
        handle: Any = remote_cls.remote(section, settle_loop, crash_hook, index, namespace)
        ray.get(handle.ready.remote(), timeout=max(section.actor_call_timeout_s, 60.0))
        handles.append(handle)
    return handles


def get_payments_client(section: PaymentsSection, *, namespace: str | None = None) -> "PaymentsClient":
    """A client of the already running named workers."""
    handles = [ray.get_actor(section.worker_actor_name(i), namespace=namespace) for i in range(section.workers)]
    return PaymentsClient(handles, section.actor_call_timeout_s)


class PaymentsClient:
    """PaymentsAPI over the workers' handles, with a timeout and error translation on every call."""

    def __init__(self, handle: Any | list[Any], timeout_s: float) -> None:
        self.handles: list[Any] = list(handle) if isinstance(handle, list | tuple) else [handle]
        if not self.handles:
            raise ValueError("a payments client needs at least one worker handle")
        self.handle = self.handles[0]
        self.timeout_s = timeout_s
        self._turn = itertools.count()
        self._dead_until: dict[int, float] = {}

    def _next_worker(self) -> int:
        """Round-robin over the workers not recently found dead (all of them when every one was)."""
        now = time.monotonic()
        for _ in range(len(self.handles)):
            index = next(self._turn) % len(self.handles)
            if self._dead_until.get(index, 0.0) <= now:
                return index
        return next(self._turn) % len(self.handles)

    async def _call(self, method: str, *args: Any) -> Any:
        tries = 2 if len(self.handles) > 1 and method in RETRY_ON_ANOTHER_WORKER else 1
        for attempt in range(tries):
            index = self._next_worker()
            try:
                return await asyncio.wait_for(getattr(self.handles[index], method).remote(*args), self.timeout_s)
            except RayTaskError as exc:
                if isinstance(exc.cause, PaymentError):
                    raise exc.cause from None
                raise
            except ActorDiedError as exc:
                self._dead_until[index] = time.monotonic() + DEAD_WORKER_SKIP_S
                if attempt + 1 < tries:
                    logger.warning("payments worker %d died during %s; retrying on another", index, method)
                    continue
                raise PaymentsUnavailable(f"payments actor call {method} failed: {exc}") from exc
            except (RayActorError, GetTimeoutError, TimeoutError) as exc:
                raise PaymentsUnavailable(f"payments actor call {method} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def __getattr__(self, name: str) -> AsyncCall:
        """Every PaymentsAPI call, forwarded by name to a worker (`_call`); nothing else."""
        if name not in PAYMENTS_METHODS:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

        async def call(*args: Any) -> Any:
            return await self._call(name, *args)

        call.__name__ = name
        return call
