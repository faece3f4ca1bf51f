"""The stage host over real gRPC + TLS on 127.0.0.1: a chain of remote stages decodes exactly what
in-process StageWorkers decode; the host answers only its coordinator and closes a stream that breaks the
protocol without going down."""

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from cluster.security.certs import CertKey, self_signed
from serve_apps.engine.executor import StageCallError
from serve_apps.engine.layer_split import StageSpec, split_layers
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.stagehost import stage_pb2 as pb
from serve_apps.stagehost.client import RemoteStage
from serve_apps.stagehost.server import STAGE_METADATA, HostLimits, StageHostServer
from serve_apps.stagehost.wire import SCHEMA_VERSION, FrameLimits, request_to_proto, weights_digest

from .conftest import HOST, TINY_HIDDEN, TINY_LAYERS

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=64)
SLOTS, MAX_LEN = 4, 128
STEPS = "/solanalm.stage.v1.StageHost/Steps"
PING = "/solanalm.stage.v1.StageHost/Ping"


def limits(model_dir: Path) -> FrameLimits:
    return FrameLimits.for_model(model_dir, SLOTS, MAX_LEN, max_batch_size=16, prefill_chunk=64)


def configs(model_dir: Path, stages: int, dtype: str = "float32") -> list[StageConfig]:
    return [StageConfig(str(model_dir), spec, dtype, SLOTS, MAX_LEN, 1) for spec in split_layers(TINY_LAYERS, stages)]


def steps_of(tokens_so_far: dict[str, list[int]], step_id: int) -> StepBatch:
    """Step 0 prefills two prompts; later steps decode both from their last tokens."""
    if step_id == 0:
        return StepBatch(0, (SeqChunk("a", 0, 0, (5, 17, 99, 3, 250), GREEDY), SeqChunk("b", 1, 0, (7, 8), SEEDED)))
    chunks = tuple(
        SeqChunk(seq, slot, start + len(tokens_so_far[seq]) - 1, (tokens_so_far[seq][-1],), sampling)
        for seq, slot, start, sampling in (("a", 0, 5, GREEDY), ("b", 1, 2, SEEDED))
    )
    return StepBatch(step_id, chunks)


async def remote_chain(
    cert: CertKey, token: str, hosts: list[StageHostServer], model_dir: Path, stages: int
) -> list[RemoteStage]:
    remotes = []
    for host, config in zip(hosts, configs(model_dir, stages), strict=True):
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(model_dir), timeout_s=30)
        info = await remote.load("tiny", config, weights_digest(model_dir, config.spec))
        assert (info.layer_start, info.layer_end) == (config.spec.start, config.spec.end)
        remotes.append(remote)
    return remotes


@pytest.mark.parametrize("stages", [2, 3])
def test_remote_stages_compute_exactly_what_in_process_workers_compute(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str, stages: int
) -> None:
    local = [StageWorker(config) for config in configs(tiny_dir, stages)]
    hosts = [start_host() for _ in range(stages)]

    async def main() -> dict[str, list[int]]:
        remotes = await remote_chain(cert, token, hosts, tiny_dir, stages)
        out: dict[str, list[int]] = {"a": [], "b": []}
        try:
            for step_id in range(9):
                batch = steps_of(out, step_id)
                mine: Any = None
                theirs: Any = None
                for worker, remote in zip(local, remotes, strict=True):
                    mine = worker.forward(batch, mine)
                    theirs = await remote.forward(batch, theirs)
                    if isinstance(mine, torch.Tensor):
                        assert isinstance(theirs, torch.Tensor) and theirs.dtype == mine.dtype
                        assert torch.equal(theirs, mine)  # bit for bit, stage by stage
                assert isinstance(theirs, StepResult) and theirs == mine
                out["a"].append(theirs.token_ids[0])
                out["b"].append(theirs.token_ids[1])
        finally:
            for remote in remotes:
                await remote.close()
        return out

    out = asyncio.run(main())
    assert len(out["a"]) == len(out["b"]) == 9
    assert [host.stage.worker.steps for host in hosts if host.stage] == [9] * stages


def test_several_steps_in_flight_come_back_in_order_on_one_stream(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host()
    config = configs(tiny_dir, 2)[0]
    local = StageWorker(config)
    batches = [StepBatch(i, (SeqChunk(f"s{i}", i % SLOTS, 0, (i + 1, i + 2), GREEDY),)) for i in range(12)]
    expected = [local.forward(b) for b in batches]

    async def main() -> list[torch.Tensor | StepResult]:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        await remote.load("tiny", config)
        try:
            return list(await asyncio.gather(*(remote.forward(b, None) for b in batches)))
        finally:
            await remote.close()

    for got, want in zip(asyncio.run(main()), expected, strict=True):
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and torch.equal(got, want)


def test_ping_describe_and_a_step_that_fails_in_compute(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host()
    config = configs(tiny_dir, 1)[0]

    async def main() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        try:
            assert await remote.ping()
            info = await remote.load("tiny", config, weights_digest(tiny_dir, config.spec))
            assert info.has_embedding and info.has_lm_head and info.extra["dtype"] == "float32"
            assert info.extra["weights_digest"] == weights_digest(tiny_dir, config.spec)
            assert host.stage is not None
            worker = host.stage.worker
            real = worker.forward

            def flaky(batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor | StepResult:
                if batch.step_id == 1:
                    raise RuntimeError("out of memory, say")
                return real(batch, hidden)

            worker.forward = flaky  # type: ignore[method-assign,assignment]  # fault injection from the test
            first = await remote.forward(StepBatch(0, (SeqChunk("a", 0, 0, (5, 6), GREEDY),)), None)
            stream = remote._stream
            with pytest.raises(StageCallError, match="out of memory"):
                await remote.forward(StepBatch(1, (SeqChunk("a", 0, 2, (7,), GREEDY),)), None)
            again = await remote.forward(StepBatch(2, (SeqChunk("a", 0, 2, (7,), GREEDY),)), None)
            assert isinstance(first, StepResult) and isinstance(again, StepResult)
            assert remote._stream is stream  # the error reply did not break the stream
            assert (await remote.describe()).steps == 2  # the failed step never reached the worker
        finally:
            await remote.close()

    asyncio.run(main())


# -- authentication and pinning --------------------------------------------------------------------------


def raw_channel(port: int, cert_pem: bytes) -> grpc.Channel:
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    return grpc.secure_channel(f"{HOST}:{port}", grpc.ssl_channel_credentials(cert_pem), options=options)


def raw_steps(
    channel: grpc.Channel, token: str | None, messages: list[bytes], host: StageHostServer | None = None
) -> tuple[list[bytes], grpc.StatusCode, str]:
    """Send raw bytes on a Steps stream for `host`'s last loaded stage; (the replies, the status it ended
    with, its details)."""
    metadata: tuple[tuple[str, str], ...] = () if token is None else (("authorization", f"Bearer {token}"),)
    if host is not None and host.stage is not None:
        metadata += ((STAGE_METADATA, host.stage.stage_id),)
    call = channel.stream_stream(STEPS)(iter(messages), metadata=metadata, timeout=30)
    replies: list[bytes] = []
    try:
        replies.extend(call)
    except grpc.RpcError as exc:
        return replies, exc.code(), exc.details() or ""
    return replies, grpc.StatusCode.OK, ""


def raw_ping(channel: grpc.Channel, token: str | None) -> grpc.StatusCode:
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    try:
        channel.unary_unary(PING)(pb.PingRequest(schema_version=SCHEMA_VERSION).SerializeToString(),
                                  metadata=metadata, timeout=10)  # fmt: skip
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def middle_stage(tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str):  # type: ignore[no-untyped-def]
    """A host serving layers 2-4 of 6 (takes hidden states, returns hidden states), steps of <= 80 tokens."""
    host = start_host(limits=HostLimits(max_step_tokens=80, max_chunks=8, max_kv_slots=8, max_len=MAX_LEN))
    config = configs(tiny_dir, 3)[1]

    async def load() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        await remote.load("tiny", config)
        await remote.close()

    asyncio.run(load())
    return host


def good_request(step_id: int = 1, tokens: tuple[int, ...] = (5, 6)) -> pb.StepRequest:
    batch = StepBatch(step_id, (SeqChunk("a", 0, 0, tokens, GREEDY),))
    return request_to_proto(batch, torch.randn(len(tokens), TINY_HIDDEN))


@pytest.mark.parametrize("presented", [None, "not-the-token", ""])
def test_a_call_without_the_link_token_is_refused_unread(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str, presented: str | None
) -> None:
    host = middle_stage(tiny_dir, start_host, cert, token)
    with raw_channel(host.port, cert.cert_pem) as channel:
        assert raw_ping(channel, presented) == grpc.StatusCode.UNAUTHENTICATED
        replies, code, _ = raw_steps(channel, presented, [good_request().SerializeToString()], host)
        assert (replies, code) == ([], grpc.StatusCode.UNAUTHENTICATED)
        assert raw_ping(channel, token) == grpc.StatusCode.OK
    assert host.stage is not None and host.stage.worker.steps == 0


def test_a_host_without_a_token_yet_refuses_everyone(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host()
    host.set_link_token(None)
    with raw_channel(host.port, cert.cert_pem) as channel:
        assert raw_ping(channel, token) == grpc.StatusCode.UNAUTHENTICATED
        assert raw_ping(channel, "") == grpc.StatusCode.UNAUTHENTICATED
        host.set_link_token(token)
        assert raw_ping(channel, token) == grpc.StatusCode.OK


def test_a_client_pinning_another_certificate_does_not_connect(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], token: str
) -> None:
    host = start_host()
    impostor_pin = self_signed([HOST]).cert_pem  # valid for the address, but not the host's certificate

    async def main() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", impostor_pin, token, limits(tiny_dir), timeout_s=5)
        try:
            assert not await remote.ping()
            with pytest.raises(StageCallError, match="UNAVAILABLE"):
                await remote.describe()
        finally:
            await remote.close()

    asyncio.run(main())


# -- a coordinator out of protocol -----------------------------------------------------------------------


def _mutate(change: Callable[[pb.StepRequest], None]) -> bytes:
    msg = good_request()
    change(msg)
    return msg.SerializeToString()


def _set(path: str, value: object) -> Callable[[pb.StepRequest], None]:
    def change(msg: pb.StepRequest) -> None:
        *parents, name = path.split(".")
        target = msg
        for part in parents:
            target = target.chunks[0] if part == "chunk" else getattr(target, part)
        if isinstance(value, list):
            del getattr(target, name)[:]
            getattr(target, name).extend(value)
        else:
            setattr(target, name, value)

    return change


BAD_REQUESTS = {
    "garbage": b"\xff\xfe\x00garbage\x07",
    "truncated": good_request().SerializeToString()[:-10],
    "wrong-schema-version": _mutate(_set("schema_version", 2)),
    "wrong-shape": _mutate(_set("hidden.shape", [2, 32])),
    "wrong-rank": _mutate(_set("hidden.shape", [128])),
    "wrong-dtype": _mutate(_set("hidden.dtype", "bfloat16")),
    "unknown-dtype": _mutate(_set("hidden.dtype", "int64")),
    "data-length-mismatch": _mutate(lambda m: setattr(m.hidden, "data", m.hidden.data[:-4])),
    "token-outside-vocab": _mutate(_set("chunk.token_ids", [5, 512])),
    "negative-token": _mutate(_set("chunk.token_ids", [5, -3])),
    "slot-outside-cache": _mutate(_set("chunk.slot", SLOTS)),
    "past-max-len": _mutate(_set("chunk.start_pos", MAX_LEN - 1)),
    "no-hidden-states": _mutate(lambda m: m.ClearField("hidden")),
    "nan-temperature": _mutate(lambda m: setattr(m.chunks[0].sampling, "temperature", float("nan"))),
    "huge-seq-id": _mutate(_set("chunk.seq_id", "x" * 10_000)),
    "too-many-tokens": request_to_proto(
        StepBatch(1, (SeqChunk("a", 0, 0, tuple(range(1, 82)), GREEDY),)), torch.randn(81, TINY_HIDDEN)
    ).SerializeToString(),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_malformed_step_closes_that_stream_only(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str, name: str
) -> None:
    host = middle_stage(tiny_dir, start_host, cert, token)
    with raw_channel(host.port, cert.cert_pem) as channel:
        ok, after = good_request(0).SerializeToString(), good_request(2).SerializeToString()
        replies, code, details = raw_steps(channel, token, [ok, BAD_REQUESTS[name], after], host)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert len(replies) == 1  # the good step before it was answered; nothing after it
        assert raw_ping(channel, token) == grpc.StatusCode.OK
        replies, code, _ = raw_steps(channel, token, [good_request(5).SerializeToString()], host)  # a fresh stream
        assert code == grpc.StatusCode.OK and len(replies) == 1
    assert host.stage is not None and host.stage.worker.steps == 2


def test_a_replayed_or_reordered_step_closes_the_stream(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = middle_stage(tiny_dir, start_host, cert, token)
    with raw_channel(host.port, cert.cert_pem) as channel:
        step = good_request(3).SerializeToString()
        replies, code, details = raw_steps(channel, token, [step, step], host)
        assert (len(replies), code) == (1, grpc.StatusCode.INVALID_ARGUMENT) and "increasing" in details
        assert raw_ping(channel, token) == grpc.StatusCode.OK


def test_a_message_over_the_hosts_size_limit_is_refused_by_grpc(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = middle_stage(tiny_dir, start_host, cert, token)
    with raw_channel(host.port, cert.cert_pem) as channel:
        replies, code, _ = raw_steps(channel, token, [b"\x00" * (host.max_message_bytes + 1)], host)
        assert (replies, code) == ([], grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert raw_ping(channel, token) == grpc.StatusCode.OK
        replies, code, _ = raw_steps(channel, token, [good_request().SerializeToString()], host)
        assert code == grpc.StatusCode.OK and len(replies) == 1


def test_steps_before_any_load_are_refused(
    start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host()
    with raw_channel(host.port, cert.cert_pem) as channel:
        _, code, _ = raw_steps(channel, token, [good_request().SerializeToString()], host)
        assert code == grpc.StatusCode.FAILED_PRECONDITION


# -- loading ---------------------------------------------------------------------------------------------


def test_other_weights_than_the_operators_are_refused(
    tiny_dir: Path, other_tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host(model_dir=other_tiny_dir)
    config = configs(tiny_dir, 2)[1]
    assert weights_digest(tiny_dir, config.spec) != weights_digest(other_tiny_dir, config.spec)

    async def main() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        try:
            with pytest.raises(StageCallError, match="FAILED_PRECONDITION"):
                await remote.load("tiny", config, weights_digest(tiny_dir, config.spec))
            assert host.stage is None
            info = await remote.load("tiny", config, weights_digest(other_tiny_dir, config.spec))
            assert info.layer_start == config.spec.start
        finally:
            await remote.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("spec", "model", "code"),
    [
        (StageSpec(1, 4, 7, False, True), "tiny", "INVALID_ARGUMENT"),  # past the model's 6 layers
        (StageSpec(0, 3, 3, False, False), "tiny", "INVALID_ARGUMENT"),  # empty
        (StageSpec(0, 0, 3, True, False), "other", "NOT_FOUND"),
    ],
)
def test_a_stage_outside_the_hosts_models_is_refused(
    tiny_dir: Path,
    start_host: Callable[..., StageHostServer],
    cert: CertKey,
    token: str,
    spec: StageSpec,
    model: str,
    code: str,
) -> None:
    host = start_host()

    async def main() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        try:
            with pytest.raises(StageCallError, match=code):
                await remote.load(model, StageConfig(str(tiny_dir), spec, "float32", SLOTS, MAX_LEN, 1))
        finally:
            await remote.close()

    asyncio.run(main())
    assert host.stage is None


def test_a_coordinators_new_load_replaces_its_own_stage(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host()
    first, second = configs(tiny_dir, 2)

    async def main() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        try:
            await remote.load("tiny", first)
            assert isinstance(await remote.forward(StepBatch(0, (SeqChunk("a", 0, 0, (5,), GREEDY),)), None),
                              torch.Tensor)  # fmt: skip
            old = remote.stage_id
            await remote.load("tiny", second)
            assert remote.stage_id != old and list(host.stages) == [remote.stage_id]
            out = await remote.forward(StepBatch(1, (SeqChunk("a", 0, 0, (5,), GREEDY),)), torch.randn(1, TINY_HIDDEN))
            assert isinstance(out, StepResult)
        finally:
            await remote.close()

    asyncio.run(main())
    assert host.stage is not None and (host.stage.worker.spec.start, host.stage.generation) == (3, 2)


def test_stages_of_several_coordinators_live_side_by_side_up_to_the_hosts_limit(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    """Each coordinator's stream reaches its own stage; a Load past max_stages drops the least recently
    used one, whose open stream then ends ABORTED (and a step naming it is refused)."""
    host = start_host(limits=HostLimits(max_stages=2))
    first, second = configs(tiny_dir, 2)
    local = {0: StageWorker(first), 1: StageWorker(second)}

    async def main() -> None:
        remotes = [RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
                   for _ in range(3)]  # fmt: skip
        try:
            await remotes[0].load("tiny", first)
            await remotes[1].load("tiny", second)
            step = StepBatch(0, (SeqChunk("a", 0, 0, (5, 6), GREEDY),))
            hidden = await remotes[0].forward(step, None)  # the first stage, although the second came later
            assert isinstance(hidden, torch.Tensor) and torch.equal(hidden, local[0].forward(step))
            assert await remotes[1].forward(step, hidden) == local[1].forward(step, hidden)
            await remotes[1].describe()  # remotes[0]'s stage is now the least recently used
            await remotes[2].load("tiny", first)
            assert set(host.stages) == {remotes[1].stage_id, remotes[2].stage_id}
            with pytest.raises(StageCallError, match="ABORTED|FAILED_PRECONDITION"):
                await remotes[0].forward(StepBatch(1, (SeqChunk("a", 0, 2, (7,), GREEDY),)), None)
            with pytest.raises(StageCallError, match="FAILED_PRECONDITION"):
                await remotes[0].forward(StepBatch(2, (SeqChunk("a", 0, 2, (7,), GREEDY),)), None)
            with pytest.raises(StageCallError, match="FAILED_PRECONDITION"):
                await remotes[0].describe()
        finally:
            for remote in remotes:
                await remote.close()

    asyncio.run(main())


def test_a_steps_call_naming_no_loaded_stage_is_refused(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = middle_stage(tiny_dir, start_host, cert, token)
    with raw_channel(host.port, cert.cert_pem) as channel:
        for metadata in ((), ((STAGE_METADATA, "1-feedface"),)):
            call = channel.stream_stream(STEPS)(
                iter([good_request().SerializeToString()]),
                metadata=(("authorization", f"Bearer {token}"), *metadata),
                timeout=30,
            )
            with pytest.raises(grpc.RpcError) as raised:
                list(call)
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert host.stage is not None and host.stage.worker.steps == 0


def test_a_malformed_stream_does_not_disturb_another_open_stream(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = middle_stage(tiny_dir, start_host, cert, token)

    async def main() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        remote.stage_id = host.stage.stage_id if host.stage else ""  # the stage another client loaded
        try:
            step = StepBatch(0, (SeqChunk("a", 0, 0, (5, 6), GREEDY),))
            assert isinstance(await remote.forward(step, torch.randn(2, TINY_HIDDEN)), torch.Tensor)
            stream = remote._stream
            with raw_channel(host.port, cert.cert_pem) as channel:  # an attacker's stream, beside it
                _, code, _ = await asyncio.to_thread(raw_steps, channel, token, [BAD_REQUESTS["garbage"]], host)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            step = StepBatch(1, (SeqChunk("a", 0, 2, (7,), GREEDY),))
            assert isinstance(await remote.forward(step, torch.randn(1, TINY_HIDDEN)), torch.Tensor)
            assert remote._stream is stream  # the same stream carried on
        finally:
            await remote.close()

    asyncio.run(main())


def test_a_plaintext_client_gets_nothing(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host()
    with grpc.insecure_channel(f"{HOST}:{host.port}") as channel:
        metadata = (("authorization", f"Bearer {token}"),)
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(PING)(pb.PingRequest(schema_version=SCHEMA_VERSION).SerializeToString(),
                                      metadata=metadata, timeout=5)  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
