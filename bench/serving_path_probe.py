"""Serving-path probe (issue 3): what streaming costs a served SolanaLM pipeline under concurrent load.

    .venv/bin/python bench/serving_path_probe.py --stages 1,3 --streams 16 --out probe.json

For each stage count it deploys `configs/serve.yaml`'s application as bench/serving_bench.py does, warms
up, then alternates two modes for `--pairs` pairs of `--seconds`-long phases (alternating, so the
machine's drift falls on both modes alike):

- `stream`: the serving benchmark's requests (`stream=True`, one SSE event per token through Serve's
  proxy to the `openai` client, as every chat UI uses it);
- `plain`: the same requests unstreamed (one JSON reply each). The gateway still reads the replica's
  token stream; the proxy and this client see one message per request instead of one per token.

Each phase repeats rounds of C requests submitted at once (C * tokens / wall time = aggregate tok/s) and
records the CPU seconds per wall second of each stage, the replica, the gateway, Serve's proxy and this
client, plus each stage's engine busy fraction and mean step time (Δbusy_s / Δsteps from /healthz, a
step's wall time inside the stage; compare with bench/stage_bench.py's engine-alone figures).
`--ingress direct` runs the whole probe with Ray Serve's experimental direct ingress
(`RAY_SERVE_ENABLE_DIRECT_INGRESS=1`: no proxy, the gateway replica listens itself, on port 30000 here)
to measure the proxy's share; it needs a Ray cluster of its own, so it cannot alternate with the proxy.
Prints a table and writes JSON with --out.
"""

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's helpers

from serving_bench import (  # noqa: E402 - after the path entry
    MODEL,
    REPO_ROOT,
    ServeProbe,
    _free_port,
    build_prompts,
    deploy_pipeline,
    init_ray,
    machine_info,
    operator_health,
    stage_cpus_for,
)

MODES = ("stream", "plain")
DIRECT_INGRESS_PORT = 30000  # Serve's first direct-ingress HTTP port (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT)


class PhaseMeter:
    """CPU seconds per wall second of the probed processes (and this one), stage busy and step time.

    `probe` measures process CPU only (made without a base URL); busy seconds and steps come from one
    /healthz reply per sample, so both are from the same moment."""

    def __init__(self, probe: ServeProbe, base: str) -> None:
        import psutil

        self.probe, self.base = probe, base
        self.probe.processes["client"] = psutil.Process()

    def sample(self) -> dict[str, float]:
        values = self.probe.cpu_seconds()
        stages = operator_health(self.base).json()["pipelines"][0]["stages"]
        for stage in stages:
            values[f"stage{stage['index']}.busy"] = float(stage.get("busy_s", 0.0))
            values[f"stage{stage['index']}.steps"] = float(stage.get("steps", 0))
        return values

    @staticmethod
    def rates(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
        """Per-process CPU/s, per-stage busy fraction and mean step ms between two samples."""
        cpu = {k: round((after[k] - v) / wall_s, 3) for k, v in before.items() if "." not in k and k in after}
        stages: dict[str, Any] = {}
        for key in (k for k in before if k.endswith(".busy") and k in after):
            name = key.removesuffix(".busy")
            busy, steps = after[key] - before[key], after[f"{name}.steps"] - before[f"{name}.steps"]
            step_ms = round(1000 * busy / steps, 2) if steps else None
            stages[name] = {"busy": round(busy / wall_s, 3), "step_ms": step_ms}
        return {"cpu_s_per_s": cpu, "stages": stages}


async def run_mode(client: Any, prompts: list[str], streams: int, tokens: int, stream: bool, seconds: float) -> int:
    """Rounds of `streams` requests at once until `seconds` have passed; the tokens generated."""

    async def one(prompt: str) -> int:
        kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0}
        if not stream:
            reply = await client.completions.create(**kwargs, extra_body={"ignore_eos": True})
            return int(reply.usage.completion_tokens)
        events = await client.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
        count = 0  # tokens, not text events: a token whose text is held back (a split character) has none
        async for chunk in events:
            if chunk.usage is not None:
                count = int(chunk.usage.completion_tokens)
        return count

    generated, deadline, rounds = 0, time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        batch = [prompts[(rounds * streams + i) % len(prompts)] for i in range(streams)]
        generated += sum(await asyncio.gather(*(one(p) for p in batch)))
        rounds += 1
    return generated


async def probe_pipeline(base: str, meter: PhaseMeter, prompts: list[str], args: argparse.Namespace) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="probe", max_retries=0, timeout=900)
    phases: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        await run_mode(client, prompts, args.streams, args.tokens, True, args.warmup_seconds)
        for _ in range(args.pairs):
            for mode in MODES:
                before, started = meter.sample(), time.perf_counter()
                tokens = await run_mode(client, prompts, args.streams, args.tokens, mode == "stream", args.seconds)
                wall = time.perf_counter() - started
                phase = {"aggregate_tok_s": round(tokens / wall, 1), "wall_s": round(wall, 1)}
                phases[mode].append({**phase, **meter.rates(before, meter.sample(), wall)})
                print(f"    {mode:6s} {phase['aggregate_tok_s']:7.1f} tok/s", flush=True)
    finally:
        await client.close()
    return {
        mode: {"aggregate_tok_s_median": round(statistics.median(p["aggregate_tok_s"] for p in runs), 1), "runs": runs}
        for mode, runs in phases.items()
    }


def probe_stage_counts(prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from cluster.deploy import read_serve_config

    stage_counts = [int(s) for s in args.stages.split(",")]
    if args.ingress == "direct":  # read by Serve's controller and replicas, so set before Ray starts them
        os.environ.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1", RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0")
    init_ray(max(stage_counts))
    app, port, results = read_serve_config(REPO_ROOT / "configs" / "serve.yaml"), _free_port(), {}
    try:
        for count in stage_counts:
            cpus = stage_cpus_for(count, "auto", os.cpu_count() or 2)
            print(f"  solanalm-{count}: deploying ({cpus} CPU per stage)", flush=True)
            entry = f"http://127.0.0.1:{DIRECT_INGRESS_PORT}" if args.ingress == "direct" else None
            app_name, base, health = deploy_pipeline(app, count, cpus, "direct", port, max(64, args.streams), entry)
            try:
                pids = [stage["pid"] for stage in health["pipelines"][0]["stages"]]
                meter = PhaseMeter(ServeProbe(pids), base)
                results[f"solanalm-{count}"] = asyncio.run(probe_pipeline(base, meter, prompts, args))
            finally:
                serve.delete(app_name)
                time.sleep(3)  # let the replica and its stage actors exit before the next deployment
    finally:
        serve.shutdown()
    return results


def print_table(results: dict[str, Any]) -> None:
    print("\npipeline | mode | tok/s (median; runs) | stage busy/step ms | CPU/s: stages; replica gateway proxy client")
    for name, modes in results.items():
        for mode, figures in modes.items():
            last = figures["runs"][-1]
            runs = ", ".join(str(r["aggregate_tok_s"]) for r in figures["runs"])
            stages = " · ".join(f"{s['busy']}/{s['step_ms']}" for s in last["stages"].values())
            cpu = last["cpu_s_per_s"]
            stage_cpu = " · ".join(str(v) for k, v in cpu.items() if k.startswith("stage"))
            serving = " ".join(str(cpu.get(k, "-")) for k in ("replica", "gateway", "proxy", "client"))
            print(f"{name} | {mode} | {figures['aggregate_tok_s_median']} ({runs}) | {stages} | {stage_cpu}; {serving}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,3", help="stage counts to deploy, one after the other")
    parser.add_argument("--streams", type=int, default=16, help="concurrent requests per round")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=102, help="tokens per prompt (approximately)")
    parser.add_argument("--seconds", type=float, default=25.0, help="length of each phase")
    parser.add_argument("--warmup-seconds", type=float, default=8.0, help="streamed load before the first phase")
    parser.add_argument("--pairs", type=int, default=2, help="stream/plain pairs per pipeline")
    parser.add_argument("--ingress", choices=("proxy", "direct"), default="proxy", help="Serve's HTTP entry")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from cluster.models import load_catalogue, materialize

    model_dir = materialize(
        load_catalogue(REPO_ROOT / "configs" / "models.yaml").get(MODEL), Path.home() / ".cache" / "solanalm"
    )
    prompts = build_prompts(AutoTokenizer.from_pretrained(model_dir), 2 * args.streams, args.prompt_tokens)
    result: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "pipelines": probe_stage_counts(prompts, args),
    }
    print_table(result["pipelines"])
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
