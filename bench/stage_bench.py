"""Stage micro-benchmark (issue 3): milliseconds per engine step of SmolLM2's 30 layers in one process.

Compares, on the same converted weights and the same inputs, in one run:

- transformers: `LlamaForCausalLM` forward of one new token per row over its `DynamicCache` (what a stage
  built from Hugging Face's decoder layers computes);
- stage-dense: SolanaLM's `StageWorker` (fused projections, slot KV cache), dense bfloat16 weights;
- stage-int4 / stage-int8: the same with every step on the packed low-bit weights (`weight_quant`,
  `low_bit_max_tokens` set above every batch), to show where each kernel pays.

Figures per torch thread count: decode ms per step and tokens/s at each batch size (rows at positions
100..102, mixed, like a running batch), and prefill ms per prompt token (one 100-token prompt).
Prints a table and writes JSON with --out. No Ray, no HTTP: the engine's compute alone.

`--background-load BUSY:SLEEP[,...]` runs that many other processes during the measurement, each
spinning BUSY ms then sleeping SLEEP ms (e.g. `1:2` takes a third of a core in 1 ms bursts): what a
served stage shares its cores with (proxy, gateway and replica wake up for every token).
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's helpers

from serving_bench import MODEL, machine_info  # noqa: E402 - after the path entries

PROMPT = 100
SYSTEMS = ("transformers", "stage-dense", "stage-int4", "stage-int8")


def timed(step: Callable[[int], object], repeats: int) -> float:
    """Median seconds of `step(i)` over `repeats` calls after two warm-up calls."""
    for i in range(2):
        step(i)
    samples = []
    for i in range(2, 2 + repeats):
        started = time.perf_counter()
        step(i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_stage(model_dir: Path, quant: str, batches: list[int], repeats: int) -> dict[str, Any]:
    import torch

    from serve_apps.engine.layer_split import StageSpec
    from serve_apps.engine.messages import SamplingParams, SeqChunk, StepBatch
    from serve_apps.engine.stage_worker import StageConfig, StageWorker

    slots = max(batches)
    config = StageConfig(
        str(model_dir),
        StageSpec(0, 0, 30, True, True),
        "bfloat16",
        slots,
        PROMPT + 64,
        torch.get_num_threads(),
        weight_quant=quant,  # type: ignore[arg-type]
        low_bit_max_tokens=10_000 if quant != "none" else 0,
    )
    worker = StageWorker(config)
    greedy = SamplingParams(temperature=0.0)
    prompt = tuple(range(10, 10 + PROMPT))
    prefill_s = timed(lambda i: worker.forward(StepBatch(i, (SeqChunk("p", 0, 0, prompt, greedy),))), repeats)
    for slot in range(slots):
        worker.forward(StepBatch(0, (SeqChunk(f"s{slot}", slot, 0, prompt, greedy),)))
    decode = {}
    for rows in batches:

        def step(i: int, rows: int = rows) -> object:
            chunks = tuple(SeqChunk(f"s{s}", s, PROMPT + (s + i) % 3, (5,), greedy) for s in range(rows))
            return worker.forward(StepBatch(i, chunks))

        decode[rows] = timed(step, repeats)
    return _figures(prefill_s, decode)


def bench_transformers(model_dir: Path, batches: list[int], repeats: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    prompt = torch.arange(10, 10 + PROMPT).view(1, -1)

    @torch.inference_mode()
    def prefill(_: int) -> object:
        return model(prompt, past_key_values=DynamicCache(), use_cache=True)

    prefill_s = timed(prefill, repeats)
    decode = {}
    for rows in batches:
        with torch.inference_mode():
            cache = model(prompt.repeat(rows, 1), past_key_values=DynamicCache(), use_cache=True).past_key_values
        token = torch.full((rows, 1), 5)

        @torch.inference_mode()
        def step(i: int, cache: Any = cache, token: torch.Tensor = token) -> object:
            out = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
            cache.crop(-1)  # drop the new token again: every step decodes at position 100
            return out

        decode[rows] = timed(step, repeats)
    return _figures(prefill_s, decode)


def _figures(prefill_s: float, decode: dict[int, float]) -> dict[str, Any]:
    return {
        "prefill_ms_per_token": round(prefill_s * 1000 / PROMPT, 3),
        "decode": {
            str(rows): {"ms_per_step": round(s * 1000, 2), "tok_s": round(rows / s, 1)} for rows, s in decode.items()
        },
    }


_SPINNER = """
import sys, time
busy, pause = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000
while True:
    started = time.perf_counter()
    while time.perf_counter() - started < busy:
        pass
    time.sleep(pause)
"""


def parse_load(spec: str) -> list[tuple[float, float]]:
    """`BUSY:SLEEP[,...]` in ms -> [(busy_ms, sleep_ms)]; empty -> no load. ValueError on a bad entry."""
    loads = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        busy, _, pause = entry.partition(":")
        load = (float(busy), float(pause))
        if load[0] <= 0 or load[1] < 0:
            raise ValueError(f"background load {entry!r}: need BUSY > 0 and SLEEP >= 0 (ms)")
        loads.append(load)
    return loads


@contextlib.contextmanager
def background_load(loads: list[tuple[float, float]]) -> Iterator[None]:
    """One spinning process per (busy_ms, sleep_ms) while the block runs; all stopped after it."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPINNER, str(busy), str(pause)]) for busy, pause in loads]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def print_table(result: dict[str, Any]) -> None:
    for threads, systems in result["threads"].items():
        batches = list(next(iter(systems.values()))["decode"])
        print(f"\n{threads} thread(s): decode ms/step (tok/s) at batch " + ", ".join(batches) + "; prefill ms/token")
        for name, figures in systems.items():
            cells = [f"{d['ms_per_step']:.1f} ({d['tok_s']:.0f})" for d in figures["decode"].values()]
            print(f"  {name:13s} " + " | ".join(cells) + f" | {figures['prefill_ms_per_token']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ", ".join(SYSTEMS))
    parser.add_argument("--batches", default="1,4,16,64", help="decode rows per step")
    parser.add_argument("--threads", default="1,2", help="torch thread counts")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per figure (median)")
    parser.add_argument(
        "--background-load", default="", help="BUSY:SLEEP ms of each spinning process run meanwhile, e.g. 1:2,0.3:2"
    )
    args = parser.parse_args()
    loads = parse_load(args.background_load)

    import torch

    from cluster.models import load_catalogue, materialize

    model_dir = materialize(
        load_catalogue(REPO_ROOT / "configs" / "models.yaml").get(MODEL),
        Path.home() / ".cache" / "solanalm",
        "bfloat16",
    )
    batches = [int(b) for b in args.batches.split(",")]
    result: dict[str, Any] = {"machine": machine_info(), "model": MODEL, "prompt_tokens": PROMPT, "threads": {}}
    result["background_load_ms"] = [list(load) for load in loads]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        systems: dict[str, Any] = {}
        for name in args.systems.split(","):
            print(f"{threads} thread(s): {name}", flush=True)
            with background_load(loads):
                if name == "transformers":
                    systems[name] = bench_transformers(model_dir, batches, args.repeats)
                else:
                    quant = name.removeprefix("stage-").replace("dense", "none")
                    systems[name] = bench_stage(model_dir, quant, batches, args.repeats)
        result["threads"][str(threads)] = systems
    print_table(result)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
