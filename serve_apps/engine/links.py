"""The direct transport: each stage streams its output to the next stage over its own TCP connection.

A step travels replica -> stage 0 -> stage 1 -> ... -> last stage -> replica, one length-prefixed frame
per hop: a protobuf `LinkFrame` of the stage protocol (serve_apps/stagehost/stage.proto): the step with,
between stages, the hidden states as raw bytes, or the last stage's reply. Never a pickle: every frame is
parsed and checked against the receiving end's `FrameLimits` (from the stage's own config), and its length
before anything is allocated; a frame that breaks them closes that link. No actor call, no object store
and no owner in between, so a hop costs a socket write and a blocking read (no polling: an idle stage uses
no CPU). Each hop is one ordered stream, so every stage sees the steps in submission order and several
steps can be in flight (pipelining).

`StageLink` is the stage's end (a thread inside the stage actor); `DirectExecutor` is the replica's.
A broken link (a stage died, a connection reset, a malformed frame) fails every step in flight with
`StageCallError`; the engine's recovery recreates dead stages and the executor links the whole chain
again, in a new generation.
"""

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from serve_apps.engine.executor import StageCallError, await_or_probe
from serve_apps.engine.messages import StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig
from serve_apps.stagehost.wire import (
    UNKNOWN,
    Expect,
    FrameLimits,
    LinkError,
    WireError,
    check_result,
    decode_link_frame,
    encode_link_frame,
    frame_buffers,
    read_message,
    read_message_async,
    write_message,
)

logger = logging.getLogger(__name__)

Address = tuple[str, int]
CONNECT_TIMEOUT_S = 30.0
TOKEN_BYTES = 32
SMALL_FRAME = 1 << 16  # frames up to this size go out in one write (a decode step's few KB)
# The bounds of a link whose owner passed no limits: any model, any step whose frame fits 256 MiB.
GENERIC_LIMITS = FrameLimits(
    hidden_size=None,
    vocab_size=None,
    kv_slots=1 << 16,
    max_len=1 << 24,
    max_step_tokens=1 << 16,
    max_chunks=1 << 12,
    frame_cap_bytes=1 << 28,
)

__all__ = ["Address", "DirectExecutor", "Frame", "LinkError", "StageLink", "recv_frame", "send_frame"]


@dataclass(frozen=True, slots=True)
class Frame:
    """What one hop carries: the step (or its result / error) and the hidden states between stages."""

    message: StepBatch | StepResult | LinkError
    tensor: torch.Tensor | None = None


def encode(frame: Frame) -> list[bytes]:
    """Frame -> buffers for one write: the length prefix and the serialized LinkFrame."""
    return frame_buffers(encode_link_frame(frame.message, frame.tensor))


def decode(payload: bytes, limits: FrameLimits = GENERIC_LIMITS, expect: Expect = UNKNOWN) -> Frame:
    """A frame's payload -> Frame; WireError when it does not parse or breaks `limits`."""
    message, tensor = decode_link_frame(payload, limits, expect)
    return Frame(message, tensor)


def send_frame(sock: socket.socket, frame: Frame) -> None:
    write_message(sock, encode_link_frame(frame.message, frame.tensor), SMALL_FRAME)


def recv_frame(sock: socket.socket, limits: FrameLimits = GENERIC_LIMITS, expect: Expect = UNKNOWN) -> Frame:
    """The next frame; ConnectionError when the peer closed the connection, WireError for a bad frame."""
    return decode(read_message(sock, limits.max_frame_bytes), limits, expect)


async def read_frame(reader: asyncio.StreamReader, limits: FrameLimits = GENERIC_LIMITS) -> Frame:
    """Async `recv_frame` for the replica's end (asyncio.IncompleteReadError at end of stream)."""
    return decode(await read_message_async(reader, limits.max_frame_bytes), limits)


def _recv_token(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        part = sock.recv(size - len(buf))
        if not part:
            raise ConnectionError("link closed by its peer")
        buf += part
    return bytes(buf)


def _connect(address: Address, token: bytes) -> socket.socket:
    sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(token)
    return sock


def _accept(listener: socket.socket, token: bytes) -> socket.socket:
    """The first connection that opens with `token`; others are closed before any frame of theirs is read."""
    listener.settimeout(CONNECT_TIMEOUT_S)
    while True:
        sock, peer = listener.accept()
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            if hmac.compare_digest(_recv_token(sock, len(token)), token):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
        except (OSError, ConnectionError):
            pass
        logger.warning("stage link: refused a connection from %s without this chain's token", peer)
        sock.close()


Compute = Callable[[StepBatch, torch.Tensor | None], torch.Tensor | StepResult]


class StageLink:
    """A stage's place in one generation of the chain: accepts its upstream, streams to its downstream.

    `compute` must serialise steps with the stage's other entry points (the stage actor runs them all on
    one compute thread), so two generations or two transports never touch the KV cache at once. Runs
    until either side closes or `close()` is called.
    Every connection of a chain opens with the chain's random `token` (handed out through Ray): a peer
    without it is refused before any frame of its is read. Frames are checked against the stage's own
    `config` (its model, KV slots, context, dtype); without one, only against generic bounds. A frame that
    breaks them closes this link (the replica links the chain again); the stage itself is untouched.
    """

    def __init__(
        self, compute: Compute, host: str, downstream: Address, token: bytes, config: StageConfig | None = None
    ) -> None:
        self._token = token
        self._compute = compute
        self._limits = GENERIC_LIMITS if config is None else FrameLimits.for_stage(config)
        self._expect = UNKNOWN if config is None else Expect(first=config.spec.first, dtype=config.dtype)
        self._closed = threading.Event()
        self._listener = socket.create_server((host, 0))
        self.address: Address = (host, self._listener.getsockname()[1])
        self._downstream = _connect(downstream, token)
        self._upstream: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"stage-link-{self.address[1]}")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._upstream = upstream = _accept(self._listener, self._token)
            self._listener.close()
            while not self._closed.is_set():
                send_frame(self._downstream, self._step(recv_frame(upstream, self._limits, self._expect)))
        except WireError as exc:
            logger.warning("stage link %s closed: its upstream sent a bad frame: %s", self.address, exc)
        except (OSError, ConnectionError, EOFError) as exc:
            if not self._closed.is_set():
                logger.info("stage link %s ended: %s", self.address, exc)
        finally:
            self.close()

    def _step(self, frame: Frame) -> Frame:
        message = frame.message
        if isinstance(message, LinkError):
            return frame  # an upstream stage's error: pass it on to the replica
        if not isinstance(message, StepBatch):
            raise WireError("a result frame sent to a stage (only the replica receives results)")
        if self._closed.is_set():
            raise ConnectionError("link closed")  # a newer generation owns the stage now
        try:
            out = self._compute(message, frame.tensor)
        except Exception as exc:  # noqa: BLE001 - the replica decides; the link stays up
            logger.exception("step %d failed on this stage", message.step_id)
            return Frame(LinkError(message.step_id, f"{type(exc).__name__}: {exc}"))
        return Frame(out) if isinstance(out, StepResult) else Frame(message, out)

    def close(self) -> None:
        """Close both connections (idempotent); a thread blocked on them wakes up and exits."""
        self._closed.set()
        for sock in (self._listener, self._upstream, self._downstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


class DirectExecutor:
    """The replica's end of the direct transport: steps go to stage 0, results come from the last stage.

    The chain is linked on the first step and again whenever a stage was recreated (`stages` is shared
    with the stage pool) or a link broke. Up to any number of steps may be in flight; each waits for its
    own result (by step id), and a stage found dead while waiting fails it at once (`await_or_probe`).
    Results are checked against their step and `limits` (the pipeline's model: a token per chunk, in its
    vocabulary); a bad frame drops the chain like a broken link.
    """

    transport = "direct"

    def __init__(
        self,
        stages: list,
        timeout_s: float,
        host: str | None = None,
        probe_s: float = 1.0,
        limits: FrameLimits | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = stages  # list[ActorHandle], shared with the stage pool
        self.limits = limits or GENERIC_LIMITS
        self.timeout_s = timeout_s
        self.probe_s = probe_s
        self.host = host
        self.generation = 0  # chains linked so far
        self._linked_for: list[Any] = []
        self._writer: asyncio.StreamWriter | None = None
        self._results: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[StepBatch, asyncio.Future[StepResult | LinkError]]] = {}
        self._linking = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # the links' streams belong to one event loop

    async def execute(self, batch: StepBatch) -> StepResult:
        future: asyncio.Future[StepResult | LinkError] = asyncio.get_running_loop().create_future()
        self._pending[batch.step_id] = (batch, future)
        try:
            writer = await self._linked()
            writer.writelines(encode(Frame(batch)))
            await writer.drain()
            result = await await_or_probe(future, self.stages, self.timeout_s, self.probe_s, batch.step_id)
        except StageCallError as exc:
            self._unlink(str(exc))
            raise
        except (OSError, ConnectionError, TimeoutError, ray.exceptions.RayError) as exc:
            self._unlink(f"{type(exc).__name__}: {exc}")
            raise StageCallError(f"step {batch.step_id} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._pending.pop(batch.step_id, None)
        if isinstance(result, LinkError):
            raise StageCallError(f"step {batch.step_id} failed on a stage: {result.message}")
        return result

    async def _linked(self) -> asyncio.StreamWriter:
        async with self._linking:
            actor_ids = [stage._actor_id for stage in self.stages]
            loop = asyncio.get_running_loop()
            if self._writer is None or actor_ids != self._linked_for or loop is not self._loop:
                self._unlink("linking the chain again")
                await self._link()
                self._linked_for, self._loop = actor_ids, loop
            assert self._writer is not None
            return self._writer

    async def _link(self) -> None:
        """Listen for the last stage, link the stages back to front, then connect to stage 0."""
        self.generation += 1
        host = self.host or ray.util.get_node_ip_address()
        token = secrets.token_bytes(TOKEN_BYTES)
        arrived: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                opened = await asyncio.wait_for(reader.readexactly(len(token)), CONNECT_TIMEOUT_S)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                opened = b""
            if arrived.done() or not hmac.compare_digest(opened, token):
                writer.close()
            else:
                arrived.set_result((reader, writer))

        server = await asyncio.start_server(on_connect, host, 0)
        try:
            address: Address = (host, server.sockets[0].getsockname()[1])
            for stage in reversed(self.stages):
                address = tuple(await asyncio.wait_for(stage.link.remote(address, token), self.timeout_s))  # type: ignore[assignment]
            _, writer = await asyncio.wait_for(asyncio.open_connection(*address), CONNECT_TIMEOUT_S)
            reader, self._results = await asyncio.wait_for(arrived, CONNECT_TIMEOUT_S)
        finally:
            server.close()
        _no_delay(writer)
        writer.write(token)
        self._writer = writer
        self._reader = asyncio.get_running_loop().create_task(self._read_results(reader), name="direct-results")
        logger.info("linked the stage chain directly (%d stages, generation %d)", len(self.stages), self.generation)

    async def _read_results(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = (await read_frame(reader, self.limits)).message
                if isinstance(message, StepBatch):
                    raise WireError("the last stage sent a step, not a result")
                batch, future = self._pending.get(message.step_id, (None, None))
                if batch is None or future is None or future.done():
                    continue  # a step that already failed (timed out, its chain dropped)
                if isinstance(message, StepResult):
                    check_result(message, batch, self.limits)
                future.set_result(message)
        except WireError as exc:
            logger.warning("the last stage's link sent a bad frame: %s", exc)
            self._unlink(f"the last stage sent a bad frame: {exc}")
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._unlink(f"the last stage's link closed: {type(exc).__name__}")

    def _unlink(self, reason: str) -> None:
        """Drop the chain (the next step links a new one) and fail every step still waiting on it."""
        if self._writer is None and self._reader is None:
            return
        with contextlib.suppress(RuntimeError):  # streams of an event loop that has since closed
            for writer in (self._writer, self._results):
                if writer is not None:
                    writer.close()
            if self._reader is not None and self._reader is not asyncio.current_task():
                self._reader.cancel()
        self._writer = self._results = self._reader = None
        self._linked_for = []
        for step_id, (_, future) in list(self._pending.items()):
            if not future.done():
                future.set_exception(StageCallError(f"step {step_id}: {reason}"))

    def close(self) -> None:
        self._unlink("the pipeline is shutting down")


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
