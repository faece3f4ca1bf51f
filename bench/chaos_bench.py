"""Chaos benchmark (issue 4): many concurrent streams while stage actors are killed at random.

    .venv/bin/python bench/chaos_bench.py --out bench-chaos.json

Deploys configs/serve.yaml's builder (one model, N stages), records each prompt's greedy answer on the
quiet system (the baseline), then for `--duration-s` keeps `--streams` concurrent streaming clients busy
(each sends a prompt, reads the whole stream, sends the next) while a killer picks a random stage actor
every `--kill-every-s` seconds and kills it (`ray.kill`, no restart: the replica must recreate it).
Kills stop when the load phase ends; requests still running then finish undisturbed.

Reported (table + one JSON object, also written to --out): requests ok / failed (with the first errors),
identical-output rate against the baseline, request latency p50/p99, kills made, stage restarts the
replica reported, and peak resident memory of the cluster's processes (sampled every second).
Targets: 0 failed, 100 % identical.
"""

import argparse
import asyncio
import datetime as dt
import json
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's helpers

from serving_bench import _wait_healthy as wait_healthy  # noqa: E402 - after the path entry
from serving_bench import operator_health, percentile  # noqa: E402


@dataclass
class Outcome:
    """What happened to one request."""

    prompt_index: int
    latency_s: float
    text: str | None
    error: str | None = None


@dataclass
class ChaosReport:
    requests_ok: int = 0
    requests_failed: int = 0
    identical: int = 0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    kills: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def identical_rate(self) -> float:
        return self.identical / self.requests_ok if self.requests_ok else 0.0


def summarize(outcomes: list[Outcome], baseline: list[str], kills: int) -> ChaosReport:
    """Count ok/failed, compare each answer with its prompt's baseline, latency percentiles."""
    report = ChaosReport(kills=kills)
    latencies = []
    errors: Counter[str] = Counter()
    for outcome in outcomes:
        if outcome.error is not None or outcome.text is None:
            report.requests_failed += 1
            errors[(outcome.error or "no text")[:160]] += 1
            continue
        report.requests_ok += 1
        latencies.append(outcome.latency_s)
        report.identical += outcome.text == baseline[outcome.prompt_index]
    if latencies:
        report.latency_p50_s = round(percentile(latencies, 50), 3)
        report.latency_p99_s = round(percentile(latencies, 99), 3)
    report.errors = dict(errors.most_common(5))
    return report


# -- the cluster side --------------------------------------------------------------------------------
def stage_actor_names(model: str) -> list[tuple[str, str]]:
    """(name, namespace) of every live stage actor of `model` (names: stage:<model>:<replica>:<i>:<a>-<b>)."""
    import ray

    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        parts = actor["name"].split(":")
        if len(parts) >= 4 and parts[0] == "stage" and parts[1] == model:
            found.append((actor["name"], actor["namespace"]))
    return sorted(found)


class Killer(threading.Thread):
    """Kills a random stage actor of the model every `every_s` seconds until stopped.

    A tick is skipped while the pipeline is not whole (a previous victim is still being recreated and
    loading): killing replacements faster than a process can start would test nothing but the clock.
    """

    def __init__(self, model: str, every_s: float, seed: int, duration_s: float) -> None:
        super().__init__(daemon=True)
        self.model, self.every_s = model, every_s
        self.deadline = time.monotonic() + duration_s  # kills stop with the load phase; stragglers then finish
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.kills: list[str] = []
        self.skipped = 0

    def run(self) -> None:
        import ray

        while not self.stop.wait(self.every_s) and time.monotonic() < self.deadline:
            actors = self._loaded_stages()
            if not actors:
                self.skipped += 1
                continue
            name, actor = self.random.choice(actors)
            try:
                ray.kill(actor, no_restart=True)
                self.kills.append(name)
            except Exception:  # noqa: BLE001 - it may be dead already (being recreated)
                continue

    def _loaded_stages(self) -> list[tuple[str, Any]]:
        """Every stage actor, if all of them answer a ping (loaded); else [] (the pipeline is recovering)."""
        import ray

        try:
            actors = [(name, ray.get_actor(name, namespace=ns)) for name, ns in stage_actor_names(self.model)]
            ray.get([actor.ping.remote() for _, actor in actors], timeout=2.0)
        except Exception:  # noqa: BLE001 - a stage is dead or still loading
            return []
        return actors


class MemorySampler(threading.Thread):
    """Peak summed RSS of this run's Ray cluster (GCS, raylet and every worker under it) and this process."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_bytes = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.peak_bytes = max(self.peak_bytes, cluster_rss_bytes())


def cluster_rss_bytes() -> int:
    """RSS of the processes Ray started for this driver (and their children), plus the driver itself.

    Only this session's processes: other Ray clusters on the machine (other test runs) are not counted.
    """
    import os

    import psutil
    import ray

    node = ray._private.worker._global_node  # the local node this driver started
    roots = [psutil.Process(os.getpid())]
    started: list[Any] = list(node.all_processes.values()) if node is not None else []
    for infos in started:
        for info in infos:
            try:
                roots.append(psutil.Process(info.process.pid))
            except psutil.Error:
                continue
    seen: dict[int, int] = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                seen[proc.pid] = proc.memory_info().rss
        except psutil.Error:
            continue
    return sum(seen.values())


# -- the client side ---------------------------------------------------------------------------------
async def request_once(client: Any, model: str, prompt: str, tokens: int) -> tuple[str | None, str | None]:
    """Stream one greedy completion; (text, None) or (None, error)."""
    parts: list[str] = []
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=tokens, temperature=0.0, stream=True, extra_body={"ignore_eos": True}
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                parts.append(chunk.choices[0].text)
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        return None, f"{type(exc).__name__}: {exc}"
    return "".join(parts), None


async def run_clients(base: str, model: str, prompts: list[str], streams: int, tokens: int, duration_s: float) -> list:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="chaos", max_retries=0, timeout=600)
    deadline = time.monotonic() + duration_s
    outcomes: list[Outcome] = []

    async def worker(index: int) -> None:
        turn = index
        while time.monotonic() < deadline:
            prompt_index = turn % len(prompts)
            started = time.perf_counter()
            text, error = await request_once(client, model, prompts[prompt_index], tokens)
            outcomes.append(Outcome(prompt_index, time.perf_counter() - started, text, error))
            turn += streams

    try:
        await asyncio.gather(*(worker(i) for i in range(streams)))
    finally:
        await client.close()
    return outcomes


async def baseline_answers(base: str, model: str, prompts: list[str], tokens: int) -> list[str]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="chaos", max_retries=0, timeout=600)
    try:
        answers = []
        for prompt in prompts:
            text, error = await request_once(client, model, prompt, tokens)
            if text is None:
                raise RuntimeError(f"baseline request failed: {error}")
            answers.append(text)
        return answers
    finally:
        await client.close()


def build_prompts(count: int) -> list[str]:
    words = [
        "river",
        "mountain",
        "market",
        "engine",
        "silver",
        "garden",
        "window",
        "history",
        "battery",
        "orbit",
        "winter",
        "signal",
        "harbor",
    ]
    rng = random.Random(0)
    return [f"Note {i}: " + " ".join(rng.choice(words) for _ in range(12)) for i in range(count)]


# -- main -------------------------------------------------------------------------------------------
def deploy_app(args: argparse.Namespace, port: int) -> tuple[str, dict]:
    import ray

    from cluster.deploy import deploy, read_serve_config, settings_for

    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False, configure_logging=False)
    app = read_serve_config(REPO_ROOT / "configs" / "serve.yaml")
    settings = settings_for(
        app,
        {
            "model": {"served": [args.model], "catalogue": str(REPO_ROOT / "configs" / "models.yaml")},
            "pipeline": {
                "num_stages": args.stages,
                "max_num_seqs": args.max_seqs,
                "max_batch_size": args.max_seqs,
                "max_queue": max(256, args.streams * 2),
                "transport": args.transport,
            },
            "http": {"port": port},
        },
    )
    deploy(app, settings)
    base = f"http://127.0.0.1:{port}"
    return base, wait_healthy(base, 600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--kill-every-s", type=float, default=10.0)
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per request (ignore_eos)")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-seqs", type=int, default=64, help="KV slots (= decode batch) of the replica")
    parser.add_argument("--transport", choices=["direct", "actor_calls", "auto", "compiled_graph"], default="direct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    started = dt.datetime.now(dt.UTC)
    base, _health = deploy_app(args, port)
    prompts = build_prompts(args.prompts)
    try:
        baseline = asyncio.run(baseline_answers(base, args.model, prompts, args.tokens))
        killer = Killer(args.model, args.kill_every_s, args.seed, args.duration_s)
        memory = MemorySampler()
        memory.start()
        killer.start()
        wall = time.perf_counter()
        outcomes = asyncio.run(run_clients(base, args.model, prompts, args.streams, args.tokens, args.duration_s))
        wall = time.perf_counter() - wall
        killer.stop.set()
        memory.stop.set()
        killer.join()
        health = operator_health(base, 60).json()
    finally:
        serve.shutdown()
        ray.shutdown()
    report = summarize(outcomes, baseline, len(killer.kills))
    result = {
        "benchmark": "chaos",
        "started": started.isoformat(timespec="seconds"),
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "wall_s": round(wall, 1),
        "report": asdict(report) | {"identical_rate": round(report.identical_rate, 4)},
        "requests_per_s": round(len(outcomes) / wall, 2),
        "peak_cluster_rss_mib": round(memory.peak_bytes / 2**20, 1),
        "health_after": health.get("status"),
        "killed": killer.kills,
        "kill_ticks_skipped_while_recovering": killer.skipped,
        "median_tokens_per_request": args.tokens,
        "latency_mean_s": round(statistics.fmean([o.latency_s for o in outcomes]), 3) if outcomes else None,
    }
    print_table(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def print_table(result: dict) -> None:
    report = result["report"]
    rows = [
        ("requests ok / failed", f"{report['requests_ok']} / {report['requests_failed']}"),
        ("identical to baseline", f"{100 * report['identical_rate']:.1f} %"),
        ("latency p50 / p99 (s)", f"{report['latency_p50_s']} / {report['latency_p99_s']}"),
        ("stage kills", str(report["kills"])),
        ("peak cluster RSS (MiB)", str(result["peak_cluster_rss_mib"])),
        ("health after", str(result["health_after"])),
    ]
    for name, value in rows:
        print(f"{name:<26} {value}")


if __name__ == "__main__":
    main()
