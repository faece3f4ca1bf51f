"""A provider's stage host: the project's own `StageWorker` behind gRPC over TLS (service StageHost).

Only the operator's coordinator, holding this provider's link token, may call it: every call must carry
`authorization: Bearer <link_token>` (checked by a server interceptor before the handler runs, so nothing
of an unauthenticated call is parsed). Messages arrive as raw bytes and are parsed by `wire` against the
loaded stage's limits; a message that does not parse or breaks them ends that call with INVALID_ARGUMENT
(the server and other streams keep running). gRPC itself refuses a message larger than the biggest step
the host's `HostLimits` allow (RESOURCE_EXHAUSTED) before allocating it.

A host holds several loaded stages at once (a stage of each model it serves, or of several coordinators),
each with its own weights and KV cache, named by the `stage_id` its Load answered: Describe names it in the
request, a Steps call in its metadata (`solanalm-stage`). A Load over `HostLimits.max_stages` drops the stage
used least recently (its streams end ABORTED), and a Load naming the stage its coordinator held before
(`replaces`) drops that one first. (A host that held one stage and let a later Load replace it computed a
stream opened after that with the last model loaded: other families' answers, issue 19.)

A host being drained (its node switching to training, `serve_apps.stagehost.modes`) refuses new Loads
(UNAVAILABLE) while its open Steps streams go on, counts those streams (`open_streams`: the coordinators
still using it) and drops its stages once they are closed (`drop_all`).

Every torch computation (loading, steps of every stream, describe) runs on one compute thread, for the
reason StageActor's docstring gives (one OpenMP team per process keeps the stage at full speed).
"""

import hmac
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from cluster.security.certs import CertKey
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import StageInfo, StepResult
from serve_apps.engine.stage_model import load_config
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.stagehost import stage_pb2 as pb
from serve_apps.stagehost.wire import (
    DTYPES,
    SCHEMA_VERSION,
    Expect,
    FrameLimits,
    LinkError,
    WireError,
    decode_request,
    encode_reply,
    weights_digest,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE = "solanalm.stage.v1.StageHost"
STAGE_METADATA = "solanalm-stage"  # a Steps call's metadata: the stage_id it is for
WEIGHT_QUANTS = ("none", "int8", "int4")


@dataclass(frozen=True, slots=True)
class HostLimits:
    """What this provider lets a coordinator ask of it (its machine's resources, its own choice)."""

    max_kv_slots: int = 256
    max_len: int = 32_768  # positions per sequence
    max_step_tokens: int = 4096  # tokens of one step
    max_chunks: int = 256  # sequences of one step
    max_torch_threads: int = 0  # 0: the CPUs this process may use
    max_streams: int = 16  # concurrent calls
    max_workers: int = 32  # gRPC handler threads (each open stream holds one)
    max_stages: int = 8  # stages loaded at once (each its own weights and KV cache); more: least recent goes

    def threads(self, requested: int) -> int:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        ceiling = self.max_torch_threads or cpus
        return max(1, min(requested or ceiling, ceiling))


@dataclass(slots=True)
class LoadedStage:
    """The stage this host serves now, with the limits its steps are checked against."""

    model: str
    worker: StageWorker
    limits: FrameLimits
    expect: Expect
    digest: str
    generation: int
    stage_id: str = ""


class StageHostServer:
    """gRPC StageHost over TLS: `start()` binds `host:port` (0: an ephemeral port) and returns the port."""

    def __init__(
        self,
        model_dirs: dict[str, Path],
        cert: CertKey,
        link_token: str | None,
        host: str = "0.0.0.0",
        port: int = 0,
        limits: HostLimits | None = None,
    ) -> None:
        self.model_dirs = {name: Path(path) for name, path in model_dirs.items()}
        self.cert = cert
        self.host, self.port = host, port
        self.limits = limits or HostLimits()
        self._token = link_token
        self._compute = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-compute")
        self._stages: OrderedDict[str, LoadedStage] = OrderedDict()  # least recently used first
        self._stages_lock = threading.Lock()  # the handler threads reorder it, Load adds and drops
        self._loading = threading.Lock()
        self._generation = 0
        self._digests: dict[tuple[str, int, int], str] = {}
        self._server: grpc.Server | None = None
        self._draining = False
        self._open_streams = 0
        self._streams_lock = threading.Lock()
        self.max_message_bytes = max(self._ceiling(path).max_frame_bytes for path in self.model_dirs.values())

    def set_link_token(self, link_token: str | None) -> None:
        """The token the coordinator presents (issued at registration); None refuses every call."""
        self._token = link_token

    # -- draining and the CPU share (a node's mode) ------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._draining

    def set_draining(self, draining: bool) -> None:
        """Refuse new Loads (True) or take them again (False); open streams are not touched."""
        self._draining = draining
        logger.info("stage host %s", "draining: new Loads refused" if draining else "takes Loads again")

    @property
    def open_streams(self) -> int:
        """Steps streams open now (each a coordinator still using a stage here)."""
        return self._open_streams

    def drop_all(self, why: str) -> int:
        """Drop every loaded stage (their weights and KV caches are freed); returns how many."""
        with self._stages_lock:
            ids = list(self._stages)
        for stage_id in ids:
            self._drop(stage_id, why)
        return len(ids)

    def set_threads(self, threads: int) -> None:
        """Torch threads of this host from now on: its loaded stages' and later Loads' ceiling."""
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.limits = replace(self.limits, max_torch_threads=threads)
        self._on_compute(torch.set_num_threads, threads)  # the compute thread's OpenMP team
        logger.info("stage host uses %d torch threads", threads)

    @property
    def stage(self) -> LoadedStage | None:
        """The stage loaded last (None: none loaded)."""
        return max(self._stages.values(), key=lambda stage: stage.generation, default=None)

    @property
    def stages(self) -> dict[str, LoadedStage]:
        """Every loaded stage by its stage_id."""
        return dict(self._stages)

    def _use(self, stage_id: str) -> LoadedStage | None:
        """The stage named `stage_id`, now the most recently used (None: not loaded here)."""
        with self._stages_lock:
            stage = self._stages.get(stage_id)
            if stage is not None:
                self._stages.move_to_end(stage_id)
            return stage

    def _drop(self, stage_id: str | None, why: str) -> None:
        """Drop `stage_id` (None: the least recently used stage)."""
        with self._stages_lock:
            if stage_id is None:
                stage_id = next(iter(self._stages), "")
            stage = self._stages.pop(stage_id, None)
        if stage is not None:
            logger.info("dropped %s layers %s (%s)", stage.model, stage.worker.spec, why)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> int:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # The coordinator pings an idle steps stream every 20 s (client.KEEPALIVE_MS): allow it, and ping
            # back so that a vanished coordinator's streams are closed.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.limits.max_workers, thread_name_prefix="stage-host"),
            handlers=[self._handlers()],
            interceptors=[_BearerAuth(lambda: self._token)],
            options=options,
            maximum_concurrent_rpcs=self.limits.max_streams,
        )
        credentials = grpc.ssl_server_credentials([(self.cert.key_pem, self.cert.cert_pem)])
        self.port = server.add_secure_port(f"{self.host}:{self.port}", credentials)
        if self.port == 0:
            raise OSError(f"could not bind the stage host to {self.host}")
        server.start()
        self._server = server
        logger.info("stage host listening on %s:%d (models %s)", self.host, self.port, sorted(self.model_dirs))
        return self.port

    def stop(self, grace: float | None = 1.0) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
        self._compute.shutdown(wait=True, cancel_futures=True)

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    def _handlers(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Load": unary(self._load),
                "Describe": unary(self._describe),
                "Ping": unary(self._ping),
                "Steps": grpc.stream_stream_rpc_method_handler(self._steps),
            },
        )

    # -- unary calls -------------------------------------------------------------------------------------
    def _load(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = _parse(pb.LoadRequest, raw, context)
        if self._draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this stage host is draining: it takes no new stages")
        with self._loading:
            config, limits, model_dir = self._plan_load(request, context)
            digest = self._digest(request.model, model_dir, config.spec)
            if request.expected_digest and not hmac.compare_digest(request.expected_digest, digest):
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"layers {config.spec.start}-{config.spec.end} of {request.model!r} here have digest {digest}, "
                    f"not {request.expected_digest}: other weights",
                )
            # Memory of stages that go is freed before the new one is built.
            if request.replaces:
                self._drop(request.replaces, "its coordinator loaded another")
            while len(self._stages) >= self.limits.max_stages:
                self._drop(None, f"least recently used of {self.limits.max_stages}")
            try:
                worker = self._on_compute(StageWorker, config)
            except Exception as exc:  # noqa: BLE001 - reported to the coordinator, the host keeps serving
                logger.exception("could not load %s layers %d-%d", request.model, config.spec.start, config.spec.end)
                context.abort(grpc.StatusCode.INTERNAL, f"loading failed: {type(exc).__name__}: {exc}")
            self._generation += 1
            expect = Expect(first=config.spec.first, last=config.spec.last, dtype=config.dtype)
            stage_id = f"{self._generation}-{secrets.token_hex(8)}"
            stage = LoadedStage(request.model, worker, limits, expect, digest, self._generation, stage_id)
            with self._stages_lock:
                self._stages[stage_id] = stage
        logger.info(
            "loaded %s layers %d-%d as stage %s (digest %s; %d stages here)",
            request.model, config.spec.start, config.spec.end, stage_id, digest, len(self._stages),
        )  # fmt: skip
        return self._description(stage).SerializeToString()

    def _plan_load(self, request: Any, context: grpc.ServicerContext) -> tuple[StageConfig, FrameLimits, Path]:
        """The stage a LoadRequest asks for, within this host's models and limits (else the call aborts)."""
        if request.schema_version != SCHEMA_VERSION:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"schema version {request.schema_version}")
        model_dir = self.model_dirs.get(request.model)
        if model_dir is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this host does not serve {request.model!r}")
        assert model_dir is not None  # (abort raised)
        model = load_config(model_dir)
        num_layers = int(model.num_hidden_layers)
        invalid = _load_problem(request, num_layers, self.limits, int(model.max_position_embeddings))
        if invalid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, invalid)
        start, end = request.layer_start, request.layer_end
        spec = StageSpec(request.stage_index, start, end, first=start == 0, last=end == num_layers)
        config = StageConfig(
            model_dir=str(model_dir),
            spec=spec,
            dtype=request.dtype,
            kv_slots=request.kv_slots,
            max_len=request.max_len,
            torch_threads=self.limits.threads(request.torch_threads),
            actor_name=f"stage-host:{request.model}:{spec.start}-{spec.end}",
            weight_quant=request.weight_quant or "none",  # type: ignore[arg-type]
            low_bit_max_tokens=request.low_bit_max_tokens,
        )
        tokens = min(request.max_step_tokens or self.limits.max_step_tokens, self.limits.max_step_tokens)
        chunks = min(request.max_chunks or request.kv_slots, self.limits.max_chunks, request.kv_slots)
        limits = FrameLimits(
            hidden_size=int(model.hidden_size),
            vocab_size=int(model.vocab_size),
            kv_slots=request.kv_slots,
            max_len=request.max_len,
            max_step_tokens=tokens,
            max_chunks=chunks,
            num_layers=num_layers,
            dtypes=frozenset({request.dtype}),
        )
        return config, limits, model_dir

    def _digest(self, model: str, model_dir: Path, spec: StageSpec) -> str:
        key = (model, spec.start, spec.end)
        if key not in self._digests:
            self._digests[key] = weights_digest(model_dir, spec)
        return self._digests[key]

    def _describe(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = _parse(pb.DescribeRequest, raw, context)
        stage = self._stages.get(request.stage_id)
        if stage is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no stage {request.stage_id!r} loaded here")
        assert stage is not None
        return self._description(stage).SerializeToString()

    def _ping(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        _parse(pb.PingRequest, raw, context)
        return pb.PingReply(schema_version=SCHEMA_VERSION).SerializeToString()

    def _description(self, stage: LoadedStage) -> pb.StageDescription:
        info: StageInfo = self._on_compute(stage.worker.describe)
        extra = {**info.extra, "dtype": stage.worker.config.dtype, "model": stage.model}
        return pb.StageDescription(
            schema_version=SCHEMA_VERSION,
            stage_index=info.stage_index,
            layer_start=info.layer_start,
            layer_end=info.layer_end,
            has_embedding=info.has_embedding,
            has_lm_head=info.has_lm_head,
            param_count=info.param_count,
            param_bytes=info.param_bytes,
            rss_bytes=info.rss_bytes,
            load_rss_bytes=info.load_rss_bytes,
            pid=info.pid,
            node_id=info.node_id,
            actor_name=info.actor_name,
            torch_threads=info.torch_threads,
            kv_slots=info.kv_slots,
            kv_capacity_tokens=info.kv_capacity_tokens,
            extra=extra,
            busy_s=info.busy_s,
            steps=info.steps,
            cpus=info.cpus,
            weights_digest=stage.digest,
            stage_id=stage.stage_id,
        )

    # -- steps -------------------------------------------------------------------------------------------
    def _steps(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Each step parsed against the named stage's limits, computed, answered in order."""
        with self._streams_lock:
            self._open_streams += 1
        try:
            yield from self._stream(requests, context)
        finally:
            with self._streams_lock:
                self._open_streams -= 1

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        stage_id = dict(context.invocation_metadata() or ()).get(STAGE_METADATA, "")
        stage = self._use(stage_id)
        if stage is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"no stage {stage_id!r} loaded here ({STAGE_METADATA} metadata)"
            )
        assert stage is not None
        last_step: int | None = None
        for raw in requests:
            if self._use(stage_id) is not stage:
                context.abort(grpc.StatusCode.ABORTED, f"stage {stage_id} was dropped by a later Load")
            try:
                batch, hidden = decode_request(raw, stage.limits, stage.expect, last_step)
            except WireError as exc:
                logger.warning("stage host: closed a steps stream from %s: %s", context.peer(), exc)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            last_step = batch.step_id
            out: torch.Tensor | StepResult | LinkError
            try:
                out = self._on_compute(stage.worker.forward, batch, hidden)
            except Exception as exc:  # noqa: BLE001 - the coordinator decides; the stream stays up
                logger.exception("step %d failed on this stage", batch.step_id)
                out = LinkError(batch.step_id, f"{type(exc).__name__}: {exc}")
            yield encode_reply(batch.step_id, out)

    def _on_compute(self, fn: Callable[..., T], *args: object) -> T:
        return self._compute.submit(fn, *args).result()

    def _ceiling(self, model_dir: Path) -> FrameLimits:
        """The largest step this host would accept for `model_dir` (sizes gRPC's message limits)."""
        config = load_config(model_dir)
        return FrameLimits(
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            kv_slots=self.limits.max_kv_slots,
            max_len=self.limits.max_len,
            max_step_tokens=self.limits.max_step_tokens,
            max_chunks=self.limits.max_chunks,
        )


def _load_problem(request: Any, num_layers: int, limits: HostLimits, model_len: int) -> str:
    """Why a LoadRequest cannot be served here ('' if it can)."""
    if request.num_layers != num_layers:
        return f"the model here has {num_layers} layers, the request says {request.num_layers}"
    if not 0 <= request.layer_start < request.layer_end <= num_layers:
        return f"layers {request.layer_start}-{request.layer_end} outside the model's 0-{num_layers}"
    if request.dtype not in DTYPES:
        return f"dtype {request.dtype!r} not one of {sorted(DTYPES)}"
    if (request.weight_quant or "none") not in WEIGHT_QUANTS:
        return f"weight_quant {request.weight_quant!r} not one of {WEIGHT_QUANTS}"
    if not 1 <= request.kv_slots <= limits.max_kv_slots:
        return f"kv_slots {request.kv_slots} outside 1..{limits.max_kv_slots}"
    if not 1 <= request.max_len <= min(limits.max_len, model_len):
        return f"max_len {request.max_len} outside 1..{min(limits.max_len, model_len)}"
    if request.max_step_tokens > limits.max_step_tokens or request.max_chunks > limits.max_chunks:
        return f"steps of {request.max_step_tokens} tokens / {request.max_chunks} chunks exceed this host's limits"
    return ""


def _parse(kind: type, raw: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
    msg = kind()
    try:
        msg.ParseFromString(raw)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a {kind.__name__}: {exc}")
    return msg


class _BearerAuth(grpc.ServerInterceptor):
    """Every call must carry `authorization: Bearer <link token>`; others end UNAUTHENTICATED unread."""

    def __init__(self, token: Callable[[], str | None]) -> None:
        self._token = token

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        token = self._token()
        presented = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        expected = f"Bearer {token}" if token else ""
        if handler is not None and expected and hmac.compare_digest(presented.encode(), expected.encode()):
            return handler
        if handler is None:
            return None
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def refuse(_request: object, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "this stage host needs its link token")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
