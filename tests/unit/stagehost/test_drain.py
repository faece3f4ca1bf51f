"""A draining stage host (its node switching to training) over real gRPC + TLS: new Loads are refused, the
open stream keeps computing, the host counts it until it closes, then drops its stages; HostStages drives
that against a fake registration; the thread share changes the compute thread's torch threads."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cluster.security.certs import CertKey
from serve_apps.engine.executor import StageCallError
from serve_apps.engine.messages import SeqChunk, StepBatch
from serve_apps.stagehost.client import RemoteStage
from serve_apps.stagehost.node_sides import HostStages
from serve_apps.stagehost.server import StageHostServer
from serve_apps.stagehost.wire import weights_digest

from .conftest import HOST
from .test_stage_host import GREEDY, configs, limits


class FakeAgent:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def drain(self) -> None:
        self.calls.append("drain")

    def register(self) -> None:
        self.calls.append("register")


def wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_a_draining_host_refuses_loads_and_keeps_its_open_stream_until_it_closes(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host()
    first, second = configs(tiny_dir, 2)

    async def main() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        other = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        try:
            await remote.load("tiny", first, weights_digest(tiny_dir, first.spec))
            out = await remote.forward(StepBatch(0, (SeqChunk("a", 0, 0, (5, 6), GREEDY),)), None)
            assert isinstance(out, torch.Tensor) and host.open_streams == 1
            host.set_draining(True)
            with pytest.raises(StageCallError, match="UNAVAILABLE"):
                await other.load("tiny", second, weights_digest(tiny_dir, second.spec))
            # The sequence in flight goes on while the operator moves the stages elsewhere.
            out = await remote.forward(StepBatch(1, (SeqChunk("a", 0, 2, (7,), GREEDY),)), None)
            assert isinstance(out, torch.Tensor) and host.open_streams == 1
        finally:
            await remote.close()
            await other.close()

    asyncio.run(main())
    assert wait_for(lambda: host.open_streams == 0)
    assert host.drop_all("drained") == 1 and host.stages == {}
    host.set_draining(False)

    async def again() -> None:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        try:
            await remote.load("tiny", second, weights_digest(tiny_dir, second.spec))
        finally:
            await remote.close()

    asyncio.run(again())
    assert len(host.stages) == 1


def test_host_stages_drains_waits_for_the_streams_and_registers_again(
    tiny_dir: Path, start_host: Callable[..., StageHostServer], cert: CertKey, token: str
) -> None:
    host = start_host()
    agent = FakeAgent()
    side = HostStages(host, agent, poll_s=0.05)
    first = configs(tiny_dir, 2)[0]

    async def load_and_step() -> RemoteStage:
        remote = RemoteStage(f"{HOST}:{host.port}", cert.cert_pem, token, limits(tiny_dir), timeout_s=30)
        await remote.load("tiny", first, weights_digest(tiny_dir, first.spec))
        await remote.forward(StepBatch(0, (SeqChunk("a", 0, 0, (5,), GREEDY),)), None)
        return remote

    loop = asyncio.new_event_loop()
    try:
        remote = loop.run_until_complete(load_and_step())
        assert side.drain(timeout_s=0.3) is False  # the stream is still open: timed out, stages dropped anyway
        assert agent.calls == ["drain"] and host.draining and host.stages == {}
        loop.run_until_complete(remote.close())
        assert wait_for(lambda: host.open_streams == 0)
        assert side.drain(timeout_s=5) is True
        assert side.describe() == {"draining": True, "stages": 0, "open_streams": 0}
        side.register()
        assert agent.calls == ["drain", "drain", "register"] and not host.draining
    finally:
        loop.close()


def test_the_hosts_thread_share_applies_to_its_compute_thread_and_later_loads(
    start_host: Callable[..., StageHostServer],
) -> None:
    host = start_host()
    host.set_threads(1)
    assert host.limits.max_torch_threads == 1 and host.limits.threads(8) == 1
    assert host._on_compute(torch.get_num_threads) == 1
    with pytest.raises(ValueError):
        host.set_threads(0)
