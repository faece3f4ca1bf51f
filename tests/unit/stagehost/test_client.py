"""RemoteStage against stage hosts that break the protocol (fakes in this file, over real gRPC + TLS):
every in-flight step fails with StageCallError / StageProtocolError and the next step opens a new stream."""

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from cluster.security.certs import CertKey
from serve_apps.engine.executor import StageCallError
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.stagehost import stage_pb2 as pb
from serve_apps.stagehost.client import RemoteStage, StageProtocolError
from serve_apps.stagehost.wire import SCHEMA_VERSION, FrameLimits, encode_reply, tensor_to_proto

from .conftest import HOST, TINY_HIDDEN, TINY_VOCAB

GREEDY = SamplingParams(temperature=0.0)
MIDDLE = StageSpec(1, 2, 4, False, False)
LAST = StageSpec(2, 4, 6, False, True)
LIMITS = FrameLimits(hidden_size=TINY_HIDDEN, vocab_size=TINY_VOCAB, kv_slots=4, max_len=128, max_step_tokens=80,
                     max_chunks=4, num_layers=6)  # fmt: skip

Liar = Callable[[pb.StepRequest], bytes | None]  # a bad reply to the stream's first step (None: hang up)


def honest(request: pb.StepRequest, last: bool) -> bytes:
    tokens = sum(len(c.token_ids) for c in request.chunks)
    if last:
        return encode_reply(request.step_id, StepResult(request.step_id, tuple(1 if c.sample else -1
                                                                                 for c in request.chunks)))  # fmt: skip
    return encode_reply(request.step_id, torch.zeros(tokens, TINY_HIDDEN))


class FakeHost:
    """Answers the first step of its first stream with `liar`, everything else honestly."""

    def __init__(self, cert: CertKey, liar: Liar, last: bool, delay_s: float = 0.0) -> None:
        self.liar, self.last, self.delay_s = liar, last, delay_s
        self.streams = 0
        self.tokens: list[str] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.method_handlers_generic_handler(
            "solanalm.stage.v1.StageHost", {"Steps": grpc.stream_stream_rpc_method_handler(self._steps)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        credentials = grpc.ssl_server_credentials([(cert.key_pem, cert.cert_pem)])
        self.port = self.server.add_secure_port(f"{HOST}:0", credentials)
        self.server.start()

    def _steps(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            self.streams += 1
            lying = self.streams == 1
        self.tokens.append(dict(context.invocation_metadata()).get("authorization", ""))
        for index, raw in enumerate(requests):
            request = pb.StepRequest.FromString(raw)
            if lying and index == 0:
                if self.delay_s:
                    time.sleep(self.delay_s)
                bad = self.liar(request)
                if bad is None:
                    return
                yield bad
            else:
                yield honest(request, self.last)


def hidden_reply(step_id: int, tensor: torch.Tensor) -> bytes:
    return pb.StepReply(
        schema_version=SCHEMA_VERSION, step_id=step_id, hidden=tensor_to_proto(tensor)
    ).SerializeToString()


def tokens_reply(step_id: int, *tokens: int) -> bytes:
    return pb.StepReply(
        schema_version=SCHEMA_VERSION, step_id=step_id, tokens=pb.Tokens(token_ids=tokens)
    ).SerializeToString()


MIDDLE_LIES: dict[str, Liar] = {
    "wrong-width": lambda r: hidden_reply(r.step_id, torch.zeros(2, 32)),
    "wrong-rows": lambda r: hidden_reply(r.step_id, torch.zeros(3, TINY_HIDDEN)),
    "wrong-dtype": lambda r: hidden_reply(r.step_id, torch.zeros(2, TINY_HIDDEN, dtype=torch.bfloat16)),
    "nan-free-but-short-data": lambda r: pb.StepReply(
        schema_version=SCHEMA_VERSION,
        step_id=r.step_id,
        hidden=pb.Tensor(dtype="float32", shape=[2, TINY_HIDDEN], data=b"\0" * 100),
    ).SerializeToString(),  # fmt: skip
    "tokens-from-a-middle-stage": lambda r: tokens_reply(r.step_id, 1),
    "out-of-order": lambda r: hidden_reply(r.step_id + 1, torch.zeros(2, TINY_HIDDEN)),
    "wrong-schema": lambda r: pb.StepReply(schema_version=9, step_id=r.step_id).SerializeToString(),
    "empty-reply": lambda r: pb.StepReply(schema_version=SCHEMA_VERSION, step_id=r.step_id).SerializeToString(),
    "garbage": lambda r: b"\xff\xffnot a reply",
}
LAST_LIES: dict[str, Liar] = {
    "token-outside-vocab": lambda r: tokens_reply(r.step_id, TINY_VOCAB),
    "negative-token": lambda r: tokens_reply(r.step_id, -7),
    "token-count": lambda r: tokens_reply(r.step_id, 1, 2),
    "hidden-from-the-last-stage": lambda r: hidden_reply(r.step_id, torch.zeros(2, TINY_HIDDEN)),
}


def step(step_id: int, sample: bool = True) -> StepBatch:
    return StepBatch(step_id, (SeqChunk("a", 0, 0, (5, 6), GREEDY, sample=sample),))


def run_two_then_one(host: FakeHost, cert: CertKey, spec: StageSpec, timeout_s: float = 10.0) -> list[object]:
    """Two steps in flight (the first gets the lie), then one more; what each returned or raised."""

    async def main() -> list[object]:
        remote = RemoteStage(
            f"{HOST}:{host.port}", cert.cert_pem, "tok", LIMITS, timeout_s, stage=spec, dtype="float32"
        )
        hidden = torch.randn(2, TINY_HIDDEN)
        try:
            first = await asyncio.gather(remote.forward(step(1), hidden), remote.forward(step(2), hidden),
                                         return_exceptions=True)  # fmt: skip
            return [*first, await remote.forward(step(3), hidden)]
        finally:
            await remote.close()

    return asyncio.run(main())


@pytest.mark.parametrize("name", list(MIDDLE_LIES))
def test_a_bad_reply_from_a_middle_stage_fails_the_steps_in_flight(cert: CertKey, name: str) -> None:
    host = FakeHost(cert, MIDDLE_LIES[name], last=False)
    try:
        first, second, third = run_two_then_one(host, cert, MIDDLE)
    finally:
        host.server.stop(0)
    assert isinstance(first, StageProtocolError), first
    assert isinstance(second, StageCallError)
    assert isinstance(third, torch.Tensor) and third.shape == (2, TINY_HIDDEN)
    assert host.streams == 2 and set(host.tokens) == {"Bearer tok"}


@pytest.mark.parametrize("name", list(LAST_LIES))
def test_a_bad_reply_from_the_last_stage_fails_the_steps_in_flight(cert: CertKey, name: str) -> None:
    host = FakeHost(cert, LAST_LIES[name], last=True)
    try:
        first, second, third = run_two_then_one(host, cert, LAST)
    finally:
        host.server.stop(0)
    assert isinstance(first, StageProtocolError), first
    assert isinstance(second, StageCallError)
    assert third == StepResult(3, (1,)) and host.streams == 2


def test_a_token_for_a_chunk_that_does_not_sample_is_refused(cert: CertKey) -> None:
    host = FakeHost(cert, lambda r: tokens_reply(r.step_id, 3), last=True)

    async def main() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, "tok", LIMITS, 10, stage=LAST, dtype="float32")
        try:
            with pytest.raises(StageProtocolError, match="does not sample"):
                await remote.forward(step(1, sample=False), torch.randn(2, TINY_HIDDEN))
            assert await remote.forward(step(2, sample=False), torch.randn(2, TINY_HIDDEN)) == StepResult(2, (-1,))
        finally:
            await remote.close()

    try:
        asyncio.run(main())
    finally:
        host.server.stop(0)


def test_a_stream_that_ends_fails_the_steps_in_flight(cert: CertKey) -> None:
    host = FakeHost(cert, lambda r: None, last=False)
    try:
        first, second, third = run_two_then_one(host, cert, MIDDLE)
    finally:
        host.server.stop(0)
    assert isinstance(first, StageCallError) and "ended" in str(first)
    assert isinstance(second, StageCallError)
    assert isinstance(third, torch.Tensor)


def test_a_step_that_times_out_fails_and_the_stream_is_reopened(cert: CertKey) -> None:
    host = FakeHost(cert, lambda r: hidden_reply(r.step_id, torch.zeros(2, TINY_HIDDEN)), last=False, delay_s=1.5)
    try:
        started = time.perf_counter()
        first, second, third = run_two_then_one(host, cert, MIDDLE, timeout_s=0.5)
    finally:
        host.server.stop(0)
    assert isinstance(first, StageCallError) and "timed out" in str(first)
    assert isinstance(second, StageCallError)
    assert isinstance(third, torch.Tensor) and host.streams == 2
    assert time.perf_counter() - started < 5


def test_ping_is_false_when_nothing_listens(cert: CertKey, tmp_path: Path) -> None:
    async def main() -> bool:
        remote = RemoteStage(f"{HOST}:1", cert.cert_pem, "tok", LIMITS, timeout_s=1)
        try:
            return await remote.ping()
        finally:
            await remote.close()

    assert asyncio.run(main()) is False
