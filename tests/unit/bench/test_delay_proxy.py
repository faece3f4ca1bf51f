"""bench/delay_proxy.py: an echo server behind it answers after >= 2 D, bytes intact, in order, and
round trips in flight overlap (the delay is latency, not a per-read sleep)."""

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.unit.bench.bench_loader import load_bench


@pytest.fixture(scope="module")
def delay_proxy() -> ModuleType:
    return load_bench("delay_proxy")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address  # type: ignore[misc]
    server.shutdown()
    server.server_close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        part = sock.recv(size - len(buf))
        assert part, "connection closed early"
        buf += part
    return bytes(buf)


def test_a_round_trip_takes_twice_the_delay_and_bytes_arrive_intact(
    delay_proxy: ModuleType, echo: tuple[str, int]
) -> None:
    payload = os.urandom(1 << 20)
    with delay_proxy.DelayProxy(echo, delay_ms=40) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        assert time.perf_counter() - started >= 0.080
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(s, len(payload)) == payload
        sender.join()


def test_round_trips_in_flight_overlap(delay_proxy: ModuleType, echo: tuple[str, int]) -> None:
    """Ten messages sent 5 ms apart come back in about 2 D + 45 ms, not 10 x 2 D."""
    with delay_proxy.DelayProxy(echo, delay_ms=50) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        for i in range(10):
            s.sendall(bytes([i]) * 8)
            time.sleep(0.005)
        assert recv_exactly(s, 80) == b"".join(bytes([i]) * 8 for i in range(10))
        elapsed = time.perf_counter() - started
    assert 0.100 <= elapsed < 0.5


def test_zero_delay_and_a_closed_target(delay_proxy: ModuleType, echo: tuple[str, int]) -> None:
    with delay_proxy.DelayProxy(echo, delay_ms=0) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
    closed = socket.create_server(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()
    with delay_proxy.DelayProxy(address, delay_ms=5) as proxy, socket.create_connection(("127.0.0.1", proxy.port)) as s:
        assert s.recv(1) == b""  # nothing to forward to: the proxy hangs up
    with pytest.raises(ValueError):
        delay_proxy.DelayProxy(address, delay_ms=-1)
