"""The replica contract: what every model replica implements, whichever engine runs the model.

The gateway (through `ServeHandleBackend`) calls only these methods, so a PipelineServer, a llama.cpp
replica, a vLLM replica and a proxy are interchangeable behind it:

- `generate(GenerateRequest)` streams `Accepted` or `Rejected` first, then `TextDelta`s, then one
  `Finished` whose token counts are final and whose `providers` (and `proxy`) say who is paid;
- `describe()` reports the replica (`PipelineInfo`; `extra["backend"]` names the engine);
- `check_health()` raises when Serve should replace the replica.
"""

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol, runtime_checkable

from serve_apps.protocol import GenerateEvent, GenerateRequest, PipelineInfo, Rejected


@runtime_checkable
class ModelReplica(Protocol):
    """One Serve replica of one model."""

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]: ...

    async def describe(self) -> PipelineInfo: ...

    async def check_health(self) -> None: ...


class AdmissionGate:
    """At most `max_running` requests at once and `max_waiting` queued behind them; more are refused.

    A replica calls `reserve()` (a 503 `Rejected` when full), runs inside `async with gate.slot():`, and
    calls `release()` in a `finally` (a client that goes away while queued frees its place too).
    """

    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running, self.max_waiting = max_running, max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self.running = 0
        self.waiting = 0
        self.reserved = 0

    def reserve(self) -> Rejected | None:
        """Take a place (running or queued); a Rejected when there is none."""
        if self.reserved >= self.max_running + self.max_waiting:
            return Rejected(
                503,
                f"server overloaded: {self.max_running} running and {self.max_waiting} queued",
                code="overloaded",
                retry_after_s=1.0,
            )
        self.reserved += 1
        return None

    def release(self) -> None:
        """Give back a place taken by `reserve`."""
        self.reserved -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a running slot (in the queue meanwhile), hold it for the body."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


def replica_id(prefix: str = "local") -> str:
    """The Serve replica id, or a process-unique id outside Serve (tests)."""
    serve = sys.modules.get("ray.serve")  # inside a replica Serve is imported; elsewhere not worth importing
    try:
        if serve is not None:
            return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside a replica
        pass
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def node_id() -> str:
    """This process's Ray node id ('' outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def node_wallet(label_prefix: str) -> str | None:
    """The provider wallet label (`<label_prefix>/wallet`) of the node this replica runs on, if any."""
    import ray

    if not ray.is_initialized():
        return None
    here = node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here:
            return (node.get("Labels") or {}).get(f"{label_prefix}/wallet")
    return None
