"""Stage protocol benchmark: what a step costs over the operator's direct links vs a provider's gRPC stage host.

On one machine, for a model's layers split into `--stages` stages (all in this process, one thread each):

- compute: the stages' StageWorkers called in turn, no transport (the floor);
- codec: encode + decode of one hop's frame (a step and its hidden states), the old pickle format of
  serve_apps/engine/links.py against the protobuf LinkFrame (with its checks) that replaced it, fastest
  of --repeats rounds;
- direct: the operator path: `DirectExecutor` and in-process `StageLink`s over TCP (stage -> stage);
- grpc: the provider path: one `StageHostServer` per stage (gRPC + TLS, link token), the coordinator
  calling each in turn through `RemoteStage` (hub: coordinator -> stage -> coordinator -> next stage);
- grpc_delay: the same with each stage host behind `delay_proxy` (D ms each way), 1..8 steps in flight.

Steps: decode steps of 1 and 16 rows (at position --prompt, over prefilled slots) and one prefill chunk of
--prompt tokens. Latency is the median ms per step with one step in flight; throughput the steps/s with k in
flight (k steps submitted together, repeated). No Ray. Prints JSON; --out writes it too.
"""

import argparse
import asyncio
import json
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from delay_proxy import DelayProxy  # noqa: E402 - after the path entries

HOST = "127.0.0.1"
ROWS = (1, 16)


def model_dir(name: str, scratch: Path) -> Path:
    """'tiny' (built here, 6 layers, hidden 64), 'smollm2' (the materialized bf16 copy), or a path."""
    if name == "tiny":
        import torch
        from transformers import LlamaForCausalLM

        from cluster.models.tiny import tiny_llama_config

        torch.manual_seed(0)
        LlamaForCausalLM(tiny_llama_config(vocab_size=512, num_layers=6)).save_pretrained(scratch / "tiny")
        return scratch / "tiny"
    if name == "smollm2":
        from cluster.models.catalogue import load_catalogue
        from cluster.models.materialize import materialize

        spec = load_catalogue(REPO_ROOT / "configs" / "models.yaml").get("smollm2-135m-instruct")
        return materialize(spec, Path.home() / ".cache" / "solanalm", "bfloat16")
    return Path(name)


def steps(rows: int, prompt: int, step_id: int, slots: int, offset: int = 0) -> Any:
    """A decode step of `rows` rows at position `prompt` (rows 0 means the prefill chunk of `prompt` tokens)."""
    from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch

    greedy = SamplingParams(temperature=0.0)
    if rows == 0:
        return StepBatch(step_id, (SeqChunk("p", offset % slots, 0, tuple(range(10, 10 + prompt)), greedy),))
    chunks = tuple(SeqChunk(f"s{r}", (offset + r) % slots, prompt, (5 + r,), greedy) for r in range(rows))
    return StepBatch(step_id, chunks)


# -- codec ----------------------------------------------------------------------------------------------


def old_pickle_frame(message: Any, tensor: Any) -> bytes:
    """The pickle format links.py used before the protobuf codec (header, pickled meta, raw bytes)."""
    import struct

    head = pickle.dumps((message, str(tensor.dtype), tuple(tensor.shape)), protocol=pickle.HIGHEST_PROTOCOL)
    raw = tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy().data
    return b"".join((struct.pack("!IQ", len(head), len(raw)), head, raw))


def old_pickle_decode(data: bytes) -> Any:
    import struct

    import torch

    head_len, raw_len = struct.unpack("!IQ", data[:12])
    message, dtype_name, shape = pickle.loads(data[12 : 12 + head_len])
    raw = bytearray(data[12 + head_len :])
    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    return message, torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)


def bench_codec(hidden: int, vocab: int, dtype: str, prompt: int, repeats: int) -> dict[str, Any]:
    import torch

    from serve_apps.stagehost.wire import Expect, FrameLimits, decode_link_frame, encode_link_frame

    limits = FrameLimits(hidden, vocab, kv_slots=64, max_len=prompt + 64, max_step_tokens=prompt + 64, max_chunks=64)
    out: dict[str, Any] = {}
    expect = Expect(first=False, dtype=dtype)
    for rows in (*ROWS, 0):
        batch = steps(rows, prompt, 1, 64)
        tensor = torch.randn(batch.num_tokens, hidden).to(getattr(torch, dtype))

        def pickled(b: Any = batch, t: Any = tensor) -> object:
            return old_pickle_decode(old_pickle_frame(b, t))

        def proto(b: Any = batch, t: Any = tensor) -> object:
            return decode_link_frame(encode_link_frame(b, t), limits, expect)

        out[label(rows, prompt)] = {
            "bytes_pickle": len(old_pickle_frame(batch, tensor)),
            "bytes_protobuf": len(encode_link_frame(batch, tensor)),
            "us_pickle": round(best_s(pickled, repeats) * 1e6, 1),
            "us_protobuf": round(best_s(proto, repeats) * 1e6, 1),
        }
    return out


def best_s(fn: Callable[[], object], repeats: int, number: int = 100) -> float:
    """The fastest of `repeats` rounds of `number` calls, per call (a micro-benchmark on a shared machine)."""
    import timeit

    return min(timeit.repeat(fn, number=number, repeat=repeats)) / number


def label(rows: int, prompt: int) -> str:
    return f"prefill_{prompt}" if rows == 0 else f"decode_{rows}"


# -- a chain and its measurements -----------------------------------------------------------------------

Step = Callable[[Any], Awaitable[Any]]


async def measure(run: Step, prompt: int, slots: int, repeats: int, inflight: tuple[int, ...]) -> dict[str, Any]:
    """Latency (1 in flight) for each step kind, and 16-row decode throughput with k in flight."""
    ids = iter(range(1, 10**9))
    for slot in range(slots):  # prefill every slot so that decodes attend over `prompt` real positions
        await run(steps(0, prompt, next(ids), slots, slot))
    latency = {}
    for rows in (*ROWS, 0):
        samples = []
        for i in range(repeats + 2):
            started = time.perf_counter()
            await run(steps(rows, prompt, next(ids), slots, i))
            if i >= 2:
                samples.append(time.perf_counter() - started)
        latency[label(rows, prompt)] = round(statistics.median(samples) * 1000, 2)
    throughput = {}
    for k in inflight:
        rounds = max(2, repeats // k)
        started, per_step = time.perf_counter(), list[float]()

        async def one(j: int, per_step: list[float] = per_step) -> None:
            t0 = time.perf_counter()
            await run(steps(16, prompt, next(ids), slots, 16 * j))
            per_step.append(time.perf_counter() - t0)

        for _ in range(rounds):
            await asyncio.gather(*(one(j) for j in range(k)))
        elapsed = time.perf_counter() - started
        throughput[str(k)] = {
            "steps_s": round(rounds * k / elapsed, 1),
            "tok_s": round(rounds * k * 16 / elapsed, 1),
            "ms_per_step": round(statistics.median(per_step) * 1000, 2),
        }
    return {"latency_ms": latency, "decode16_inflight": throughput}


def configs(path: Path, stages: int, dtype: str, slots: int, max_len: int) -> list[Any]:
    from serve_apps.engine.layer_split import split_layers
    from serve_apps.engine.stage_model import load_config
    from serve_apps.engine.stage_worker import StageConfig

    layers = int(load_config(path).num_hidden_layers)
    return [StageConfig(str(path), spec, dtype, slots, max_len, 1) for spec in split_layers(layers, stages)]


class _LinkStage:
    """What DirectExecutor uses of a stage actor handle (`link.remote`, `ping.remote`), in this process."""

    def __init__(self, worker: Any, name: str) -> None:
        self._actor_id, self.worker = name, worker
        self.current: Any = None
        self.link, self.ping = _Remote(self._link), _Remote(lambda: True)

    def _link(self, downstream: Any, token: bytes) -> Any:
        from serve_apps.engine.links import StageLink

        if self.current is not None:
            self.current.close()
        self.current = StageLink(self.worker.forward, HOST, downstream, token, config=self.worker.config)
        return self.current.address


class _Remote:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return asyncio.to_thread(self.fn, *args)


async def bench_compute(cfgs: list[Any], prompt: int, repeats: int, inflight: tuple[int, ...]) -> dict[str, Any]:
    """The floor: the same stages' StageWorkers called in turn in this thread (no transport at all)."""
    from serve_apps.engine.stage_worker import StageWorker

    workers = [StageWorker(c) for c in cfgs]

    async def chain(batch: Any) -> Any:
        hidden: Any = None
        for worker in workers:
            hidden = worker.forward(batch, hidden)
        return hidden

    return await measure(chain, prompt, cfgs[0].kv_slots, repeats, inflight[:1])


async def bench_direct(cfgs: list[Any], prompt: int, repeats: int, inflight: tuple[int, ...]) -> dict[str, Any]:
    from serve_apps.engine.links import DirectExecutor
    from serve_apps.engine.stage_worker import StageWorker
    from serve_apps.stagehost.wire import FrameLimits

    workers = [StageWorker(c) for c in cfgs]
    limits = FrameLimits.for_stage(cfgs[-1], max_step_tokens=prompt + 16 * max(inflight))
    executor = DirectExecutor([_LinkStage(w, f"s{i}") for i, w in enumerate(workers)], 120, HOST, limits=limits)
    try:
        return await measure(executor.execute, prompt, cfgs[0].kv_slots, repeats, inflight)
    finally:
        executor.close()


async def bench_grpc(
    path: Path, cfgs: list[Any], prompt: int, repeats: int, inflight: tuple[int, ...], delay_ms: float | None
) -> dict[str, Any]:
    import secrets

    from cluster.security.certs import self_signed
    from serve_apps.stagehost.client import RemoteStage
    from serve_apps.stagehost.server import HostLimits, StageHostServer
    from serve_apps.stagehost.wire import FrameLimits, weights_digest

    cert, token = self_signed([HOST]), secrets.token_urlsafe(32)
    host_limits = HostLimits(max_kv_slots=cfgs[0].kv_slots, max_len=cfgs[0].max_len, max_step_tokens=prompt + 64)
    servers = [StageHostServer({"m": path}, cert, token, HOST, 0, host_limits) for _ in cfgs]
    proxies: list[DelayProxy] = []
    limits = FrameLimits.for_model(path, cfgs[0].kv_slots, cfgs[0].max_len, 16, prompt)
    remotes = []
    try:
        for server, config in zip(servers, cfgs, strict=True):
            port = server.start()
            if delay_ms is not None:
                proxies.append(DelayProxy((HOST, port), delay_ms))
                port = proxies[-1].start()
            remote = RemoteStage(f"{HOST}:{port}", cert.cert_pem, token, limits, 120)
            await remote.load("m", config, weights_digest(path, config.spec))
            remotes.append(remote)

        async def hub(batch: Any) -> Any:
            hidden: Any = None
            for remote in remotes:
                hidden = await remote.forward(batch, hidden)
            return hidden

        return await measure(hub, prompt, cfgs[0].kv_slots, repeats, inflight)
    finally:
        for remote in remotes:
            await remote.close()
        for proxy in proxies:
            proxy.stop()
        for server in servers:
            server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, smollm2 (the materialized bf16 copy) or a model dir")
    parser.add_argument("--dtype", default=None, help="stage dtype (default: float32 for tiny, bfloat16 otherwise)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128, help="prefill chunk tokens; decodes run at this position")
    parser.add_argument("--slots", type=int, default=16, help="KV slots per stage")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per latency figure (median)")
    parser.add_argument("--inflight", default="1,2,4,8", help="steps in flight for the throughput figures")
    parser.add_argument("--delays", default="10,50", help="ms each way of the delayed gRPC runs ('' for none)")
    parser.add_argument("--delay-repeats", type=int, default=8, help="timed steps per figure through the proxy")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    args = parser.parse_args()

    import torch

    from serve_apps.engine.stage_model import load_config

    torch.set_num_threads(1)
    inflight = tuple(int(k) for k in args.inflight.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        path = model_dir(args.model, Path(scratch))
        dtype = args.dtype or ("float32" if args.model == "tiny" else "bfloat16")
        model = load_config(path)
        cfgs = configs(path, args.stages, dtype, args.slots, args.prompt + 64)
        result: dict[str, Any] = {
            "model": args.model,
            "dtype": dtype,
            "stages": [[c.spec.start, c.spec.end] for c in cfgs],
            "hidden_size": int(model.hidden_size),
            "prompt_tokens": args.prompt,
            "cpus": len(__import__("os").sched_getaffinity(0)),
        }
        print("codec", flush=True)
        result["codec"] = bench_codec(int(model.hidden_size), int(model.vocab_size), dtype, args.prompt, args.repeats)
        print("compute alone", flush=True)
        result["compute"] = asyncio.run(bench_compute(cfgs, args.prompt, args.repeats, inflight))
        print("direct links", flush=True)
        result["direct"] = asyncio.run(bench_direct(cfgs, args.prompt, args.repeats, inflight))
        print("grpc + tls", flush=True)
        result["grpc"] = asyncio.run(bench_grpc(path, cfgs, args.prompt, args.repeats, inflight, None))
        result["grpc_delay"] = {}
        for delay in (float(d) for d in args.delays.split(",") if d):
            print(f"grpc + tls, {delay:g} ms each way", flush=True)
            result["grpc_delay"][f"{delay:g}ms"] = asyncio.run(
                bench_grpc(path, cfgs, args.prompt, args.delay_repeats, inflight, delay)
            )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
