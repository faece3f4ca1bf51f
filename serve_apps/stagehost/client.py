"""The coordinator's end of the stage protocol: one provider stage host over gRPC + TLS (grpc.aio).

The channel trusts exactly the provider's registered certificate (its self-signed PEM is the only root), and
every call carries the provider's link token. Steps go over ONE persistent bidirectional stream per
`RemoteStage`, opened on first use, for the stage its `load` got (the host may hold other stages, of other
models or coordinators, beside it: the stream names its stage_id): several may be in flight, and the host
answers them in order, so the i-th reply belongs to the i-th step sent. Every reply is parsed and checked
against the step it answers and the pipeline's `FrameLimits` (hidden states [tokens, hidden] of the stage's
dtype from a stage that is not the last, one in-vocabulary token per sampling chunk from the last). A reply
that breaks them, a stream that ends or fails, or a step that times out fails every step in flight with
`StageProtocolError` / `StageCallError`; the next step opens a new stream. A step the host could not compute
(an error reply) fails only that step.
"""

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import torch

from serve_apps.engine.executor import StageCallError
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import StageInfo, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig
from serve_apps.stagehost import stage_pb2 as pb
from serve_apps.stagehost.wire import (
    SCHEMA_VERSION,
    Expect,
    FrameLimits,
    LinkError,
    WireError,
    decode_reply,
    encode_request,
)

logger = logging.getLogger(__name__)

SERVICE = "/solanalm.stage.v1.StageHost/"
STAGE_METADATA = "solanalm-stage"  # names the loaded stage a Steps call is for (server.STAGE_METADATA)
DEFAULT_LOAD_TIMEOUT_S = 600.0
KEEPALIVE_MS = 20_000


class StageProtocolError(StageCallError):
    """The stage host answered outside the protocol (a malformed or out-of-limits reply, out of order)."""


@dataclass(slots=True)
class _Stream:
    call: Any  # grpc.aio.StreamStreamCall
    pending: deque[tuple[StepBatch, Expect, asyncio.Future[torch.Tensor | StepResult]]] = field(default_factory=deque)
    reader: asyncio.Task[None] | None = None
    broken: bool = False


class RemoteStage:
    """One provider stage, as the coordinator's hub executor calls it (`forward`, `ping`, `describe`).

    `stage_id` names the host's stage its steps go to (`load` sets it; another client of the same stage, e.g.
    on another event loop, is given it). `stage` / `dtype` say what replies to expect (a hidden-states reply
    of that dtype, or tokens); `load` sets them too. Without them a reply of either kind is accepted if it is
    well-formed for the step (the hub executor checks the kind), and a first stage's hidden states may have
    any allowed dtype. Bound to the event loop it is first used on (grpc.aio).
    """

    def __init__(
        self,
        endpoint: str,
        cert_pem: bytes,
        link_token: str,
        limits: FrameLimits,
        timeout_s: float,
        stage: StageSpec | None = None,
        dtype: str | None = None,
        server_name: str | None = None,
        stage_id: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.timeout_s = timeout_s
        self.stage = stage
        self.dtype = dtype
        self._metadata = (("authorization", f"Bearer {link_token}"),)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", limits.max_frame_bytes),
            ("grpc.max_send_message_length", limits.max_frame_bytes),
            # An idle steps stream across a NAT would otherwise die silently and the next step would wait
            # out its whole timeout; pings every 20 s find a dead path within 30 s (the host permits them).
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=cert_pem)
        self._channel = grpc.aio.secure_channel(endpoint, credentials, options=options)
        self._stream: _Stream | None = None
        self.stage_id = stage_id  # the host's name for the stage (set by `load`; empty: none yet)
        self._write_lock = asyncio.Lock()
        self._steps = self._channel.stream_stream(SERVICE + "Steps")

    # -- unary calls -------------------------------------------------------------------------------------
    async def load(
        self, model: str, config: StageConfig, expected_digest: str = "", timeout_s: float | None = None
    ) -> StageInfo:
        """Ask the host to load `config`'s layers of `model` from its own copy; it refuses weights whose
        digest differs from `expected_digest` (FAILED_PRECONDITION). Raises StageCallError on any failure."""
        spec = config.spec
        request = pb.LoadRequest(
            schema_version=SCHEMA_VERSION,
            model=model,
            layer_start=spec.start,
            layer_end=spec.end,
            num_layers=self.limits.num_layers,
            dtype=config.dtype,
            kv_slots=config.kv_slots,
            max_len=config.max_len,
            weight_quant=config.weight_quant,
            low_bit_max_tokens=config.low_bit_max_tokens,
            torch_threads=config.torch_threads,
            expected_digest=expected_digest,
            max_step_tokens=self.limits.max_step_tokens,
            max_chunks=self.limits.max_chunks,
            stage_index=spec.index,
            replaces=self.stage_id,
        )
        raw = await self._unary("Load", request, timeout_s or max(self.timeout_s, DEFAULT_LOAD_TIMEOUT_S))
        description = self._parse_description(raw)
        info = self._stage_info(description, spec)
        if not description.stage_id:
            raise StageProtocolError(f"{self.endpoint} loaded layers {spec} but named no stage")
        self.stage, self.dtype, self.stage_id = spec, config.dtype, description.stage_id
        await self._reset("a new stage was loaded")
        return info

    async def describe(self) -> StageInfo:
        request = pb.DescribeRequest(schema_version=SCHEMA_VERSION, stage_id=self.stage_id)
        return self._stage_info(self._parse_description(await self._unary("Describe", request)))

    async def ping(self) -> bool:
        """True when the host answers an authenticated ping within the timeout; False on any failure."""
        try:
            raw = await self._unary("Ping", pb.PingRequest(schema_version=SCHEMA_VERSION), self.timeout_s)
            reply = pb.PingReply.FromString(raw)
        except Exception:  # noqa: BLE001 - whatever went wrong, the stage is not usable
            return False
        return reply.schema_version == SCHEMA_VERSION

    async def _unary(self, method: str, request: Any, timeout_s: float | None = None) -> bytes:
        call = self._channel.unary_unary(SERVICE + method)
        try:
            raw: bytes = await call(
                request.SerializeToString(), metadata=self._metadata, timeout=timeout_s or self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise StageCallError(f"{self.endpoint} {method}: {exc.code().name}: {exc.details()}") from exc
        return raw

    def _parse_description(self, raw: bytes) -> Any:
        try:
            return pb.StageDescription.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf's parse errors
            raise StageProtocolError(f"{self.endpoint}: not a StageDescription: {exc}") from exc

    def _stage_info(self, d: Any, spec: StageSpec | None = None) -> StageInfo:
        if d.schema_version != SCHEMA_VERSION:
            raise StageProtocolError(f"{self.endpoint}: schema version {d.schema_version}")
        if spec is not None and (d.layer_start, d.layer_end) != (spec.start, spec.end):
            raise StageProtocolError(f"{self.endpoint} loaded layers {d.layer_start}-{d.layer_end}, not {spec}")
        return StageInfo(
            stage_index=d.stage_index,
            layer_start=d.layer_start,
            layer_end=d.layer_end,
            has_embedding=d.has_embedding,
            has_lm_head=d.has_lm_head,
            param_count=d.param_count,
            param_bytes=d.param_bytes,
            rss_bytes=d.rss_bytes,
            load_rss_bytes=d.load_rss_bytes,
            pid=d.pid,
            node_id=d.node_id,
            actor_name=d.actor_name,
            torch_threads=d.torch_threads,
            kv_slots=d.kv_slots,
            kv_capacity_tokens=d.kv_capacity_tokens,
            extra={**dict(d.extra), "weights_digest": d.weights_digest},
            busy_s=d.busy_s,
            steps=d.steps,
            cpus=d.cpus,
        )

    # -- steps -------------------------------------------------------------------------------------------
    async def forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor | StepResult:
        """This stage's output for `batch`: hidden states [tokens, hidden], or (last stage) the sampled tokens."""
        try:
            payload = encode_request(batch, hidden)
        except WireError as exc:
            raise StageCallError(f"step {batch.step_id} cannot be sent: {exc}") from exc
        if len(payload) > self.limits.max_frame_bytes:
            raise StageCallError(f"step {batch.step_id} is {len(payload)} bytes, over the stage protocol's limit")
        expect = self._expect(hidden)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor | StepResult] = loop.create_future()
        # A timer on the future itself, not wait_for(shield(future)): each of those layers costs the reply
        # another pass of the event loop, which in a busy replica loop is every other ready task's time.
        timer = loop.call_later(self.timeout_s, self._time_out, future, batch.step_id)
        try:
            async with self._write_lock:  # writes, and so the order of `pending`, are the order of the stream
                if not future.done():  # (it timed out waiting for the lock: not sent at all)
                    await self._send(batch, expect, future, payload)
            return await future  # a cancelled caller cancels it; the reader then skips its reply
        finally:
            timer.cancel()

    async def _send(
        self, batch: StepBatch, expect: Expect, future: asyncio.Future[torch.Tensor | StepResult], payload: bytes
    ) -> None:
        stream = self._open()
        stream.pending.append((batch, expect, future))
        try:
            await stream.call.write(payload)
        except Exception as exc:  # noqa: BLE001 - grpc raises AioRpcError, InvalidStateError, ...
            self._fail(stream, StageCallError(f"{self.endpoint}: step {batch.step_id} not sent: {exc!r}"))

    def _time_out(self, future: asyncio.Future[torch.Tensor | StepResult], step_id: int) -> None:
        """A step in flight past the timeout: the stream is dropped and every step on it fails."""
        stream = self._stream
        error = StageCallError(f"{self.endpoint}: step {step_id} timed out after {self.timeout_s}s")
        if stream is not None and any(pending is future for _, _, pending in stream.pending):
            self._fail(stream, error)
        if not future.done():
            future.set_exception(error)

    def _expect(self, hidden: torch.Tensor | None) -> Expect:
        dtype = self.dtype
        if dtype is None and hidden is not None and hidden.numel():
            dtype = str(hidden.dtype).removeprefix("torch.")  # a stage's output has its input's dtype
        last = self.stage.last if self.stage is not None else None
        return Expect(first=hidden is None, last=last, dtype=dtype)

    def _open(self) -> _Stream:
        stream = self._stream
        if stream is None or stream.broken:
            stream = _Stream(self._steps(metadata=(*self._metadata, (STAGE_METADATA, self.stage_id))))
            stream.reader = asyncio.get_running_loop().create_task(self._read(stream), name="stage-replies")
            self._stream = stream
        return stream

    async def _read(self, stream: _Stream) -> None:
        try:
            while True:
                raw = await stream.call.read()
                if raw is grpc.aio.EOF:
                    code = await stream.call.code()
                    details = await stream.call.details()
                    raise StageCallError(f"{self.endpoint}: the steps stream ended: {code.name}: {details}")
                if not stream.pending:
                    raise StageProtocolError(f"{self.endpoint}: a reply with no step in flight")
                batch, expect, future = stream.pending[0]  # left in place until its reply checks out
                try:
                    out = decode_reply(raw, self.limits, batch, expect)
                except WireError as exc:
                    raise StageProtocolError(f"{self.endpoint}: step {batch.step_id}: {exc}") from exc
                stream.pending.popleft()
                if future.done():
                    continue
                if isinstance(out, LinkError):
                    future.set_exception(StageCallError(f"{self.endpoint}: step {out.step_id} failed: {out.message}"))
                else:
                    future.set_result(out)
        except asyncio.CancelledError:
            raise
        except StageCallError as exc:
            logger.warning("%s", exc)
            self._fail(stream, exc)
        except grpc.aio.AioRpcError as exc:
            error = StageCallError(f"{self.endpoint}: the steps stream failed: {exc.code().name}: {exc.details()}")
            self._fail(stream, error)
        except Exception as exc:  # noqa: BLE001 - anything else breaks the stream the same way
            self._fail(stream, StageCallError(f"{self.endpoint}: the steps stream failed: {exc!r}"))

    def _fail(self, stream: _Stream, error: StageCallError) -> None:
        """Drop `stream` (the next step opens a new one) and fail every step in flight on it."""
        stream.broken = True
        if self._stream is stream:
            self._stream = None
        stream.call.cancel()
        if stream.reader is not None and stream.reader is not asyncio.current_task():
            stream.reader.cancel()
        while stream.pending:
            _, _, future = stream.pending.popleft()
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here: a step that already timed out no longer awaits it

    async def _reset(self, reason: str) -> None:
        if self._stream is not None:
            self._fail(self._stream, StageCallError(f"{self.endpoint}: {reason}"))

    async def close(self) -> None:
        """Fail the steps in flight and close the channel (its calls finish on this event loop)."""
        stream = self._stream
        await self._reset("the stage client is closing")
        if stream is not None and stream.reader is not None:
            with contextlib.suppress(BaseException):
                await stream.reader
        with contextlib.suppress(Exception):
            await self._channel.close()
