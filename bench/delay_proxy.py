"""A TCP proxy on 127.0.0.1 that delays every byte by D ms in each direction (a wide-area link's latency).

Each direction is a reader and a writer joined by a queue: the reader stamps each chunk with its arrival
time and keeps reading; the writer sends each chunk when arrival + D has passed. So order and throughput
are kept and only latency is added (a sleep per read would serialize round trips and cut throughput).
No bandwidth limit, no loss, no jitter. Hand-written because it is 100 lines and only benchmarks use it
(toxiproxy and tc/netem need a daemon or root).

Library:
    with DelayProxy(("127.0.0.1", 50051), delay_ms=10) as proxy:
        connect_to(proxy.port)
CLI:
    python bench/delay_proxy.py --target 127.0.0.1:50051 --delay-ms 10 [--port 0]
"""

import argparse
import asyncio
import contextlib
import socket
import threading
import time
from types import TracebackType

CHUNK = 1 << 16


class DelayProxy:
    """Listens on `host:port` (0: ephemeral) and forwards each connection to `target`, D ms each way."""

    def __init__(self, target: tuple[str, int], delay_ms: float, host: str = "127.0.0.1", port: int = 0) -> None:
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        self.target = target
        self.delay_s = delay_ms / 1000
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- in a running event loop -------------------------------------------------------------------------
    async def serve(self) -> int:
        """Start listening on the running loop; returns the port."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        for writer in (client_w, server_w):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for reader, writer in ((client_r, server_w), (server_r, client_w)):
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            for coro in (self._read(reader, queue), self._write(queue, writer)):
                task = asyncio.get_running_loop().create_task(coro)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _read(self, reader: asyncio.StreamReader, queue: "asyncio.Queue[tuple[float, bytes]]") -> None:
        try:
            while chunk := await reader.read(CHUNK):
                queue.put_nowait((time.monotonic() + self.delay_s, chunk))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((time.monotonic() + self.delay_s, b""))  # end of stream, delayed like the data

    async def _write(self, queue: "asyncio.Queue[tuple[float, bytes]]", writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                due, chunk = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    # -- on a thread of its own ------------------------------------------------------------------------
    def start(self) -> int:
        """Run the proxy on a background thread with its own event loop; returns the port."""
        started = threading.Event()
        box: dict[str, BaseException] = {}

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.serve())
            except BaseException as exc:  # noqa: BLE001 - re-raised in start()
                box["error"] = exc
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=f"delay-proxy-{self.delay_s * 1000:g}ms")
        self._thread.start()
        started.wait()
        if "error" in box:
            raise box["error"]
        return self.port

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop = self._thread = None

    def __enter__(self) -> "DelayProxy":
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="added latency in each direction")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="listen port (0: ephemeral, printed)")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    proxy = DelayProxy((host, int(port)), args.delay_ms, args.host, args.port)

    async def run() -> None:
        print(f"{args.host}:{await proxy.serve()} -> {args.target} (+{args.delay_ms:g} ms each way)", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
