"""The direct transport over real local sockets: protobuf framing, a chain of stage links, the replica's executor.

Stages here are in-process `StageLink`s behind a fake actor handle (`link.remote`, `ping.remote`), so
the replica's `DirectExecutor` runs exactly as in a replica, without Ray.
"""

import asyncio
import socket
import struct
import threading
from pathlib import Path

import pytest
import torch

from serve_apps.engine.executor import StageCallError
from serve_apps.engine.layer_split import split_layers
from serve_apps.engine.links import Address, DirectExecutor, Frame, LinkError, StageLink, recv_frame, send_frame
from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch, StepResult
from serve_apps.engine.stage_worker import StageConfig, StageWorker
from serve_apps.stagehost.wire import FrameLimits

HOST = "127.0.0.1"
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
NEGATIVE_SLOT = 99  # the fake last stage fails a step that uses this slot


def failing(step_id: int) -> StepBatch:
    return StepBatch(step_id, (SeqChunk("bad", NEGATIVE_SLOT, 0, (1,), GREEDY),))


def batch(step_id: int, *tokens: int) -> StepBatch:
    return StepBatch(step_id, tuple(SeqChunk(f"s{i}", i, 0, (t,), GREEDY) for i, t in enumerate(tokens)))


@pytest.mark.parametrize(
    ("step", "tensor"),
    [
        (batch(7, 1, 2), torch.randn(2, 8).to(torch.bfloat16)),
        (batch(7, 1, 2), torch.randn(2, 5)),
        (StepBatch(7, (), (("gone", 3),)), torch.empty(0, 4)),
        (StepBatch(7, (), (("gone", 3),)), torch.empty(0)),
        (batch(7, 1, 2), None),
    ],
    ids=["bfloat16", "float32", "empty", "empty-1d", "none"],
)
def test_a_frame_arrives_bit_for_bit(step: StepBatch, tensor: torch.Tensor | None) -> None:
    left, right = socket.socketpair()
    with left, right:
        send_frame(left, Frame(step, tensor))
        frame = recv_frame(right)
    assert frame.message == step
    if tensor is None:
        assert frame.tensor is None
    else:
        assert frame.tensor is not None and frame.tensor.dtype == tensor.dtype and torch.equal(frame.tensor, tensor)


class FakeStage:
    """What DirectExecutor uses of a stage actor handle, with the stage's link in this process."""

    def __init__(self, compute, name: str) -> None:  # type: ignore[no-untyped-def]
        self._actor_id = name
        self.compute = compute
        self.current: StageLink | None = None
        self.dead = False
        self.link = _Remote(self._link)
        self.ping = _Remote(self._ping)

    def _link(self, downstream: Address, token: bytes) -> Address:
        if self.current is not None:
            self.current.close()
        self.current = StageLink(self.compute, HOST, downstream, token)
        return self.current.address

    def _ping(self) -> bool:
        if self.dead:
            import ray

            raise ray.exceptions.RayActorError()
        return True

    def die(self) -> None:
        self.dead = True
        assert self.current is not None
        self.current.close()


class _Remote:
    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.fn = fn

    def remote(self, *args):  # type: ignore[no-untyped-def]
        async def call():  # type: ignore[no-untyped-def]
            return await asyncio.to_thread(self.fn, *args)

        return call()


def add_one(step: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
    """A fake stage of hidden width 1: [tokens, 1] out, each row its token id plus the stages so far."""
    base = torch.tensor([[float(c.token_ids[0])] for c in step.chunks]) if hidden is None else hidden
    return base + 1


def sample(step: StepBatch, hidden: torch.Tensor | None) -> StepResult:
    assert hidden is not None
    if any(c.slot == NEGATIVE_SLOT for c in step.chunks):
        raise ValueError("negative token")
    return StepResult(step.step_id, tuple(int(v) for v in hidden[:, 0]))


def chain() -> tuple[DirectExecutor, list[FakeStage]]:
    stages = [FakeStage(add_one, "a"), FakeStage(add_one, "b"), FakeStage(sample, "c")]
    return DirectExecutor(stages, timeout_s=10, host=HOST, probe_s=0.2), stages


def test_steps_travel_the_chain_in_order_with_several_in_flight() -> None:
    executor, _ = chain()

    async def main() -> list[StepResult]:
        try:
            return list(await asyncio.gather(*(executor.execute(batch(i, i, 100 + i)) for i in range(20))))
        finally:
            executor.close()

    results = asyncio.run(main())
    assert [r.step_id for r in results] == list(range(20))
    assert [r.token_ids for r in results] == [(i + 2, 102 + i) for i in range(20)]
    assert executor.generation == 1


def test_a_stage_error_fails_only_its_step() -> None:
    executor, _ = chain()

    async def main() -> StepResult:
        try:
            with pytest.raises(StageCallError, match="negative token"):
                await executor.execute(failing(1))
            return await executor.execute(batch(2, 3))
        finally:
            executor.close()

    assert asyncio.run(main()).token_ids == (5,)


def test_a_dead_stage_fails_the_step_and_a_recreated_one_is_linked_again() -> None:
    executor, stages = chain()

    async def main() -> StepResult:
        try:
            await executor.execute(batch(1, 1))
            stages[1].die()  # its connections close, like a killed process's
            with pytest.raises(StageCallError):
                await executor.execute(batch(2, 1))
            stages[1] = FakeStage(add_one, "b2")  # what the stage pool's recovery does
            return await executor.execute(batch(3, 7))
        finally:
            executor.close()

    assert asyncio.run(main()).token_ids == (9,)
    assert executor.generation == 2


def test_a_silent_dead_stage_is_found_by_the_probe() -> None:
    """A stage that holds its connection open but is dead (its ping fails) fails the step within the probe."""
    hang = threading.Event()

    def stuck(step: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        hang.wait(5)
        return add_one(step, hidden)

    stages = [FakeStage(add_one, "a"), FakeStage(stuck, "b"), FakeStage(sample, "c")]
    executor = DirectExecutor(stages, timeout_s=10, host=HOST, probe_s=0.2)

    async def main() -> None:
        try:
            task = asyncio.ensure_future(executor.execute(batch(1, 1)))
            await asyncio.sleep(0.1)
            stages[1].dead = True
            with pytest.raises(StageCallError, match=r"stages \[1\] died"):
                await asyncio.wait_for(task, 3)
        finally:
            hang.set()
            executor.close()

    asyncio.run(main())


def test_real_stages_linked_directly_decode_what_one_stage_decodes(tiny_dir: Path) -> None:
    def workers(count: int) -> list[StageWorker]:
        specs = split_layers(6, count)
        return [StageWorker(StageConfig(str(tiny_dir), spec, "bfloat16", 2, 64, 1)) for spec in specs]

    def decode(stage_list: list[FakeStage]) -> list[int]:
        executor = DirectExecutor(stage_list, timeout_s=30, host=HOST)

        async def main() -> list[int]:
            tokens, prompt = [], (5, 9, 12, 40)
            step = StepBatch(0, (SeqChunk("x", 0, 0, prompt, GREEDY),))
            for i in range(8):
                result = await executor.execute(step)
                tokens.append(result.token_ids[0])
                step = StepBatch(i + 1, (SeqChunk("x", 0, len(prompt) + i, (tokens[-1],), GREEDY),))
            executor.close()
            return tokens

        return asyncio.run(main())

    single = decode([FakeStage(w.forward, f"one{i}") for i, w in enumerate(workers(1))])
    three = decode([FakeStage(w.forward, f"three{i}") for i, w in enumerate(workers(3))])
    assert three == single and len(single) == 8


def stage_between(token: bytes) -> tuple[StageLink, socket.socket, socket.socket]:
    """One add_one stage linked to a downstream socket here; returns (link, downstream end, listener)."""
    listener = socket.create_server((HOST, 0))
    link = StageLink(add_one, HOST, listener.getsockname()[:2], token)
    downstream, _ = listener.accept()
    assert downstream.recv(len(token), socket.MSG_WAITALL) == token
    return link, downstream, listener


def test_link_error_frames_pass_through_middle_stages() -> None:
    link, downstream, listener = stage_between(b"t" * 32)
    with socket.create_connection(link.address) as feeder, downstream, listener:
        feeder.sendall(b"t" * 32)
        send_frame(feeder, Frame(LinkError(4, "boom")))
        assert recv_frame(downstream).message == LinkError(4, "boom")
    link.close()


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our unread frame in its buffer
        return True


def test_a_connection_without_the_token_is_refused_before_any_frame_is_read() -> None:
    link, downstream, listener = stage_between(b"k" * 32)
    with downstream, listener:
        with socket.create_connection(link.address) as intruder:
            send_frame(intruder, Frame(batch(1, 5)))  # no token: its frame must never reach compute
            assert closed_by_peer(intruder)
        with socket.create_connection(link.address) as upstream:
            upstream.sendall(b"k" * 32)
            send_frame(upstream, Frame(batch(2, 5)))
            frame = recv_frame(downstream)
    assert frame.message == batch(2, 5) and frame.tensor is not None and frame.tensor.tolist() == [[6.0]]
    link.close()


def test_a_garbage_frame_closes_only_that_link_and_the_stage_links_again() -> None:
    """Bytes that are not a LinkFrame never reach compute: the link closes, the stage serves a new one."""
    computed: list[int] = []

    def counting(step: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        computed.append(step.step_id)
        return add_one(step, hidden)

    for garbage in (struct.pack("!I", 6) + b"\xff\x00garb", struct.pack("!I", 2**31)):  # bad bytes, huge length
        listener = socket.create_server((HOST, 0))
        link = StageLink(counting, HOST, listener.getsockname()[:2], b"g" * 32)
        downstream, _ = listener.accept()
        with socket.create_connection(link.address) as feeder, downstream, listener:
            feeder.sendall(b"g" * 32 + garbage)
            assert downstream.recv(32, socket.MSG_WAITALL) == b"g" * 32
            assert closed_by_peer(downstream)
    assert computed == []
    link, downstream, listener = stage_between(b"h" * 32)  # the same stage, linked again
    with socket.create_connection(link.address) as upstream, downstream, listener:
        upstream.sendall(b"h" * 32)
        send_frame(upstream, Frame(batch(3, 4)))
        assert recv_frame(downstream).tensor.tolist() == [[5.0]]  # type: ignore[union-attr]
    link.close()


def test_a_stage_link_checks_frames_against_its_own_config(tiny_dir: Path) -> None:
    """A middle stage of the tiny model (hidden 64, vocab 512, 2 slots, 64 positions) refuses frames outside it."""
    config = StageConfig(str(tiny_dir), split_layers(6, 3)[1], "float32", 2, 64, 1)
    worker = StageWorker(config)
    good = StepBatch(1, (SeqChunk("a", 0, 0, (5, 6), GREEDY),))
    bad = [
        (good, torch.randn(2, 8)),  # wrong width
        (good, torch.randn(2, 64).to(torch.bfloat16)),  # wrong dtype
        (good, torch.randn(3, 64)),  # rows != tokens
        (good, None),  # no hidden states for a middle stage
        (StepBatch(1, (SeqChunk("a", 0, 0, (512,), GREEDY),)), torch.randn(1, 64)),  # token outside the vocabulary
        (StepBatch(1, (SeqChunk("a", 2, 0, (5,), GREEDY),)), torch.randn(1, 64)),  # slot outside the cache
        (StepBatch(1, (SeqChunk("a", 0, 63, (5, 6), GREEDY),)), torch.randn(2, 64)),  # past max_len
    ]
    for step, hidden in bad:
        listener = socket.create_server((HOST, 0))
        link = StageLink(worker.forward, HOST, listener.getsockname()[:2], b"c" * 32, config=config)
        downstream, _ = listener.accept()
        with socket.create_connection(link.address) as feeder, downstream, listener:
            feeder.sendall(b"c" * 32)
            send_frame(feeder, Frame(step, hidden))
            assert downstream.recv(32, socket.MSG_WAITALL) == b"c" * 32
            assert closed_by_peer(downstream), step
    assert worker.steps == 0
    listener = socket.create_server((HOST, 0))
    link = StageLink(worker.forward, HOST, listener.getsockname()[:2], b"c" * 32, config=config)
    downstream, _ = listener.accept()
    with socket.create_connection(link.address) as feeder, downstream, listener:
        feeder.sendall(b"c" * 32)
        send_frame(feeder, Frame(good, torch.randn(2, 64)))
        assert downstream.recv(32, socket.MSG_WAITALL) == b"c" * 32
        frame = recv_frame(downstream)
    assert frame.message == good and frame.tensor is not None and frame.tensor.shape == (2, 64)
    link.close()


def test_a_result_outside_the_vocabulary_fails_the_step_and_the_chain_is_linked_again() -> None:
    def lying(step: StepBatch, hidden: torch.Tensor | None) -> StepResult:
        if step.step_id == 1:
            return StepResult(step.step_id, (10_000,))  # not a token of a 512-token vocabulary
        return sample(step, hidden)

    stages = [FakeStage(add_one, "a"), FakeStage(lying, "b")]
    limits = FrameLimits(hidden_size=1, vocab_size=512, kv_slots=128, max_len=64, max_step_tokens=64, max_chunks=16)
    executor = DirectExecutor(stages, timeout_s=10, host=HOST, probe_s=0.2, limits=limits)

    async def main() -> StepResult:
        try:
            with pytest.raises(StageCallError, match="bad frame"):
                await executor.execute(batch(1, 3))
            return await executor.execute(batch(2, 3))
        finally:
            executor.close()

    assert asyncio.run(main()).token_ids == (4,)
    assert executor.generation == 2
