"""Where one gRPC round trip to a provider's stage host spends its time (single-row decode steps).

A real `StageHostServer` runs in a separate process (as `solanalm provider serve` runs it) serving SmolLM2
layers 11-23 (bfloat16, int4 low-bit weights for steps of up to 12 tokens, 1 torch thread); a coordinator-
like client (`RemoteStage` in an asyncio loop) sends single-row decode steps at increasing positions.
Both sides stamp each step with CLOCK_MONOTONIC (system-wide, so comparable across the two processes):

    client send -> server receive (handler parses) -> compute start -> compute end -> reply encoded
    -> client reply received (the reader task parsed it) -> forward() returned

Baselines: the same StageWorker stepped in this process on the thread that loaded it (the compute floor),
and stepped on a thread other than the one that loaded it. `--load N` adds N busy processes at 50% duty
(5 ms on, 5 ms off) to mimic the contended serving machine; --gil-thread D a pure-Python thread busy D of
the time in the client. Prints JSON (medians in ms); --out writes it. Experiments, by environment:
PROBE_LOOP_TASKS=N (N other ready tasks in the client's event loop, 50 us of Python each per pass: a busy
replica loop), PROBE_CLIENT=<file> (the RemoteStage of another client.py, e.g. `git show HEAD~1:...`),
PROBE_TWO_LOOPS=1 (load from one loop's thread, step from another's, as the replica does), PROBE_INLINE=1
(the host computes on the gRPC handler thread under a lock instead of its compute thread).

    .venv/bin/python bench/stage_hop_probe.py --steps 150 --load 2
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

HOST = "127.0.0.1"
LAYERS = (11, 23)
MAX_LEN = 1024


def model_dir() -> Path:
    from cluster.models import load_catalogue, materialize

    spec = load_catalogue(str(REPO_ROOT / "configs" / "models.yaml")).get("smollm2-135m-instruct")
    return Path(materialize(spec, Path("~/.cache/solanalm").expanduser(), "bfloat16"))


def stage_config(path: Path, quant: str) -> Any:
    from serve_apps.engine.layer_split import StageSpec
    from serve_apps.engine.stage_worker import StageConfig

    spec = StageSpec(1, LAYERS[0], LAYERS[1], first=False, last=False)
    return StageConfig(str(path), spec, "bfloat16", 4, MAX_LEN, 1, "probe", quant, 12)  # type: ignore[arg-type]


def decode_step(step_id: int, pos: int) -> Any:
    from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch

    return StepBatch(step_id, (SeqChunk("s0", 0, pos, (5 + pos % 100,), SamplingParams(temperature=0.0)),))


def busy_loop(duty: float, stop: Any) -> None:
    while not stop.is_set():
        end = time.perf_counter() + 0.005 * duty * 2
        while time.perf_counter() < end:
            pass
        time.sleep(0.005 * (1 - duty) * 2)


def gil_loop(duty: float) -> None:
    """Python work holding the GIL (as the replica's other threads do), `duty` of the time."""
    while True:
        end = time.perf_counter() + 0.01 * duty
        while time.perf_counter() < end:
            pass
        time.sleep(0.01 * (1 - duty))


# -- the stage host process ----------------------------------------------------------------------------


def serve(path: Path, cert_dir: Path, token: str, port_file: Path, stamps_file: Path) -> None:
    """A stage host in this process, instrumented; stamps dumped to `stamps_file` when stdin closes."""
    import serve_apps.stagehost.server as server_mod
    from cluster.security.certs import CertKey
    from serve_apps.engine.stage_worker import StageWorker

    stamps: list[dict[str, float]] = []
    current: dict[str, float] = {}
    decode, encode, forward = server_mod.decode_request, server_mod.encode_reply, StageWorker.forward

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        current["recv"] = time.monotonic()
        return decode(*args, **kwargs)

    def timed_forward(self: Any, *args: Any) -> Any:
        current["c0"] = time.monotonic()
        try:
            return forward(self, *args)
        finally:
            current["c1"] = time.monotonic()

    def timed_encode(*args: Any) -> bytes:
        out = encode(*args)
        current["sent"] = time.monotonic()
        stamps.append(dict(current))
        return out

    server_mod.decode_request = timed_decode  # type: ignore[assignment]
    server_mod.encode_reply = timed_encode  # type: ignore[assignment]
    StageWorker.forward = timed_forward  # type: ignore[method-assign,assignment]
    cert = CertKey((cert_dir / "cert.pem").read_bytes(), (cert_dir / "key.pem").read_bytes())
    host = server_mod.StageHostServer({"smollm2": path}, cert, token, host=HOST, port=0)
    if os.environ.get("PROBE_INLINE"):  # experiment: compute on the calling (handler) thread, under a lock
        lock = threading.Lock()

        def inline(fn: Any, *args: Any) -> Any:
            with lock:
                return fn(*args)

        host._on_compute = inline  # type: ignore[method-assign]
    port_file.write_text(str(host.start()))
    sys.stdin.read()
    stamps_file.write_text(json.dumps(stamps))
    host.stop(0)


# -- the coordinator side ------------------------------------------------------------------------------


LOOP_TASKS = int(os.environ.get("PROBE_LOOP_TASKS", "0"))  # other ready tasks in the client's loop
TICK_S = 50e-6  # the Python work each does per pass of the loop


def client_class() -> Any:
    """RemoteStage, or with PROBE_CLIENT=<file> the one defined in that file (an older client.py)."""
    other = os.environ.get("PROBE_CLIENT")
    if not other:
        from serve_apps.stagehost.client import RemoteStage

        return RemoteStage
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_client", other)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RemoteStage


async def tick(work_s: float) -> None:
    while True:
        end = time.perf_counter() + work_s
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


async def load_stage(path: Path, cert_pem: bytes, token: str, port: int, quant: str) -> Any:
    from serve_apps.stagehost.client import RemoteStage
    from serve_apps.stagehost.wire import FrameLimits

    remote = RemoteStage(f"{HOST}:{port}", cert_pem, token, FrameLimits.for_model(path, 4, MAX_LEN, 16, 512), 60)
    info = await remote.load("smollm2", stage_config(path, quant))
    await remote.close()
    return info


async def run_client(
    path: Path, cert_pem: bytes, token: str, port: int, steps: int, quant: str, info: Any = None
) -> list[dict]:
    """`info`: the stage was loaded already, from another event loop (as the replica's setup thread does)."""
    import torch

    from serve_apps.stagehost.wire import FrameLimits

    RemoteStage = client_class()
    limits = FrameLimits.for_model(path, 4, MAX_LEN, 16, 512)
    ticking = [asyncio.create_task(tick(TICK_S)) for _ in range(LOOP_TASKS)]
    config = stage_config(path, quant)
    remote = RemoteStage(f"{HOST}:{port}", cert_pem, token, limits, 60, stage=config.spec, dtype=config.dtype)
    if info is None:
        info = await remote.load("smollm2", config)
    hidden = torch.randn(1, limits.hidden_size or 576).to(torch.bfloat16)
    out = []
    for i in range(steps):
        t0 = time.monotonic()
        await remote.forward(decode_step(i, i), hidden)
        out.append({"send": t0, "done": time.monotonic()})
    await remote.close()
    for task in ticking:
        task.cancel()
    out.append({"info": {"torch_threads": info.torch_threads, **info.extra}})  # type: ignore[dict-item]
    return out


def hop(path: Path, steps: int, quant: str) -> dict[str, Any]:
    import subprocess

    from cluster.security.certs import self_signed

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        cert = self_signed([HOST])
        (work / "cert.pem").write_bytes(cert.cert_pem)
        (work / "key.pem").write_bytes(cert.key_pem)
        token = secrets.token_urlsafe(16)
        code = "import sys; sys.path.insert(0, sys.argv[1]); import stage_hop_probe as p; p.serve_main(sys.argv[2:])"
        args = [str(Path(__file__).parent), str(path), scratch, token]
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, env=dict(os.environ))
        port_file = work / "port"
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
            if proc.poll() is not None:
                raise RuntimeError("stage host exited")
        port = int(port_file.read_text())
        if os.environ.get("PROBE_TWO_LOOPS"):  # as the replica: load from a setup thread's loop, step on another
            info = in_thread(lambda: asyncio.run(load_stage(path, cert.cert_pem, token, port, quant)))
            client = in_thread(lambda: asyncio.run(run_client(path, cert.cert_pem, token, port, steps, quant, info)))
        else:
            client = asyncio.run(run_client(path, cert.cert_pem, token, port, steps, quant))
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(60)
        server = json.loads((work / "stamps").read_text())
    info = client.pop()["info"]
    warm = max(5, steps // 10)
    rows = [{**c, **s} for c, s in zip(client[warm:], server[warm:], strict=True)]

    def med(a: str, b: str) -> float:
        return round(statistics.median((r[b] - r[a]) * 1e3 for r in rows), 3)

    return {
        "stage": info,
        "round_trip_ms": med("send", "done"),
        "client_send_to_server_recv_ms": med("send", "recv"),
        "server_recv_to_compute_start_ms": med("recv", "c0"),
        "compute_ms": med("c0", "c1"),
        "compute_end_to_reply_encoded_ms": med("c1", "sent"),
        "reply_encoded_to_client_done_ms": med("sent", "done"),
        "round_trip_p90_ms": round(statistics.quantiles([(r["done"] - r["send"]) * 1e3 for r in rows], n=10)[-1], 3),
    }


def in_thread(fn: Any) -> Any:
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


def serve_main(argv: list[str]) -> None:
    path, scratch, token = Path(argv[0]), Path(argv[1]), argv[2]
    serve(path, scratch, token, scratch / "port", scratch / "stamps")


def in_process(path: Path, steps: int, quant: str, same_thread: bool) -> float:
    """Median ms of a decode step of the StageWorker stepped on the thread that loaded it (or another)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from serve_apps.engine.stage_worker import StageWorker

    loader, stepper = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    worker = loader.submit(StageWorker, stage_config(path, quant)).result()
    pool = loader if same_thread else stepper
    hidden = torch.randn(1, 576).to(torch.bfloat16)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        pool.submit(worker.forward, decode_step(i, i), hidden).result()
        times.append((time.perf_counter() - t0) * 1e3)
    loader.shutdown()
    stepper.shutdown()
    del worker
    return round(statistics.median(times[max(5, steps // 10) :]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--load", type=int, default=2, help="busy processes at --duty (0: none)")
    parser.add_argument("--duty", type=float, default=0.5)
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--only", choices=["hop", "local"], default=None)
    parser.add_argument("--gil-thread", type=float, default=0.0, help="duty of a pure-Python busy thread in the client")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    path = model_dir()
    result: dict[str, Any] = {"benchmark": "stage_hop_probe", "steps": args.steps, "quant": args.quant, "runs": {}}
    stop = mp.Event()
    if args.gil_thread:
        threading.Thread(target=gil_loop, args=(args.gil_thread,), daemon=True).start()
    for load in sorted({0, args.load}):
        busy = [mp.Process(target=busy_loop, args=(args.duty, stop), daemon=True) for _ in range(load)]
        stop.clear()
        for p in busy:
            p.start()
        run: dict[str, Any] = {}
        if args.only != "hop":
            run["local_same_thread_ms"] = in_process(path, args.steps, args.quant, True)
            run["local_other_thread_ms"] = in_process(path, args.steps, args.quant, False)
        if args.only != "local":
            run["grpc"] = hop(path, args.steps, args.quant)
        stop.set()
        for p in busy:
            p.join()
        result["runs"][f"load{load}"] = run
        print(json.dumps({f"load{load}": run}), flush=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
