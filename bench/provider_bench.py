"""What serving through providers' stage hosts costs: the stage protocol and wide-area links, one run.

One local operator cluster serves SmolLM2 over three stages, split the same way each time:

- `direct-3`: three operator stage actors over today's direct TCP links (stage to stage);
- `hub-3`: an operator stage and two providers' stage hosts (`solanalm provider serve`, separate processes,
  registered over the gateway's HTTP API) over the stage protocol (gRPC + TLS, hub chain);
- `wan-<D>ms-depth<K>`: the same, with the two providers behind a TCP proxy that adds D ms each way
  (bench/delay_proxy.py: this kernel has no netem), with K steps in flight.

Each deployment is measured through the HTTP API as serving_bench.py does (single-stream decode, 16
streams). JSON result to stdout and --out; the table in docs/benchmarks.md.

    .venv/bin/python bench/provider_bench.py --out docs/results/provider_bench.json
"""

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks' helpers

from delay_proxy import DelayProxy  # noqa: E402 - after the path entry
from serving_bench import (  # noqa: E402
    MODEL,
    REPO_ROOT,
    Plan,
    ServeProbe,
    _free_port,
    _http_phases,
    _wait_healthy,
    build_prompts,
    init_ray,
    machine_info,
)

BIN = Path(sys.executable).parent
STAGES = 3


def launch_provider(work: Path, gateway: str, advertise_port: int | None, port: int = 0) -> tuple[Any, dict]:
    """`solanalm provider serve` in its own process group and HOME; returns (process, its ready line)."""
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SOLANALM_"))}
    env["HOME"] = str(work)
    keypair = work / "id.json"
    subprocess.run([str(BIN / "solanalm"), "provider", "keygen", str(keypair)], check=True, env=env)
    command = [str(BIN / "solanalm"), "provider", "serve", "--gateway", gateway, "--wallet", str(keypair)]
    command += ["--model", MODEL, "--cache-dir", str(Path("~/.cache/solanalm").expanduser()), "--port", str(port)]
    command += ["--catalogue", str(REPO_ROOT / "configs" / "models.yaml"), "--state-dir", str(work / "state")]
    if advertise_port is not None:
        command += ["--advertise-port", str(advertise_port)]
    log = (work / "provider.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.decode(errors="replace").strip()
        if line.startswith("{"):
            return process, json.loads(line)
    raise RuntimeError(f"provider exited: {(work / 'provider.log').read_text()[-2000:]}")


def deploy(app: Any, port: int, placements: dict | None, inflight: int | None, max_seqs: int) -> dict:
    from cluster.deploy import deploy as deploy_app
    from cluster.deploy import settings_for

    pipeline: dict[str, Any] = {
        "num_stages": STAGES,
        "max_batch_size": max_seqs,
        "max_num_seqs": max_seqs,
        "stage_resources": {"CPU": 1},
        "max_inflight_steps": inflight,
        "placements": {MODEL: placements} if placements else {},
    }
    settings = settings_for(
        app,
        {
            "model": {"served": [MODEL], "catalogue": str(REPO_ROOT / "configs" / "models.yaml")},
            "pipeline": pipeline,
            "http": {"port": port},
            "network": {"placement": {"use_registry": False}},
        },
    )
    deploy_app(app, settings)
    return _wait_healthy(f"http://127.0.0.1:{port}", 600)


def measure(name: str, plan: Plan, prompts: list[str], port: int, health: dict) -> dict:
    base = f"http://127.0.0.1:{port}"
    pipeline = health["pipelines"][0]
    pids = [s["pid"] for s in pipeline["stages"]]
    print(f"  {name}: measuring ({[s['node_id'][:16] for s in pipeline['stages']]})", flush=True)
    result = asyncio.run(_http_phases(plan, prompts, base, ServeProbe(pids, base)))
    result.update(
        stage_layers=[s["layers"] for s in pipeline["stages"]],
        stage_hosts=[s["node_id"] for s in pipeline["stages"]],
        max_inflight_steps=pipeline.get("max_inflight_steps"),
    )
    return result


@contextlib.contextmanager
def providers(gateway: str, work: Path, proxied: bool, count: int = 2) -> Iterator[tuple[list[str], list]]:
    """`count` providers; with `proxied`, each behind its own DelayProxy (delay 0 until set)."""
    processes, ids, proxies = [], [], []
    try:
        for i in range(count):
            proxy = None
            port = _free_port()
            if proxied:
                proxy = DelayProxy(("127.0.0.1", port), delay_ms=0)
                proxy.start()
                proxies.append(proxy)
            process, ready = launch_provider(
                work / f"{'wan' if proxied else 'lan'}{i}", gateway, proxy.port if proxy else None, port
            )
            processes.append(process)
            ids.append(str(ready["provider_id"]))
        yield ids, proxies
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
        for proxy in proxies:
            proxy.stop()


def run(plan: Plan, delays: list[float], depths: list[int], max_seqs: int) -> dict:
    import ray
    from ray import serve

    from cluster.deploy import read_serve_config

    init_ray(STAGES)
    app = read_serve_config(REPO_ROOT / "configs" / "serve.yaml")
    port = _free_port()
    gateway = f"http://127.0.0.1:{port}"
    from transformers import AutoTokenizer

    from cluster.config import load_settings
    from cluster.models import load_catalogue, materialize

    settings = load_settings()
    spec = load_catalogue(REPO_ROOT / "configs" / "models.yaml").get(MODEL)
    model_dir = materialize(spec, settings.model.cache_dir, spec.dtype)
    prompts = build_prompts(AutoTokenizer.from_pretrained(model_dir), 64, plan.prompt_tokens)
    results: dict[str, dict] = {}
    health = deploy(app, port, None, None, max_seqs)
    layers = [end - start for start, end in (s["layers"] for s in health["pipelines"][0]["stages"])]
    operator_node = ray.get_runtime_context().get_node_id()
    results["direct-3"] = measure("direct-3", plan, prompts, port, health)
    with tempfile.TemporaryDirectory(prefix="provider-bench-") as tmp:
        with providers(gateway, Path(tmp), proxied=False) as (lan, _):
            placement = {"stage_layers": layers, "node_ids": [operator_node, *lan]}
            health = deploy(app, port, placement, None, max_seqs)
            results["hub-3"] = measure("hub-3", plan, prompts, port, health)
        with providers(gateway, Path(tmp), proxied=True) as (wan, proxies):
            placement = {"stage_layers": layers, "node_ids": [operator_node, *wan]}
            for delay in delays:
                for proxy in proxies:
                    proxy.delay_s = delay / 1000
                for depth in depths:
                    name = f"wan-{delay:g}ms-depth{depth}"
                    health = deploy(app, port, placement, depth, max_seqs)
                    results[name] = {"delay_ms_each_way": delay, **measure(name, plan, prompts, port, health)}
    serve.shutdown()
    ray.shutdown()
    return results


def print_table(results: dict[str, dict]) -> None:
    print(f"{'system':<22} {'single tok/s':>12} {'16 streams tok/s':>17} {'depth':>6}")
    for name, result in results.items():
        single = result.get("decode", {}).get("decode_tok_s")
        many = result.get("concurrency", {}).get("16", {}).get("aggregate_tok_s")
        print(f"{name:<22} {single!s:>12} {many!s:>17} {result.get('max_inflight_steps')!s:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    parser.add_argument("--delays-ms", default="10,50", help="added latency each way, comma list")
    parser.add_argument("--depths", default="3,8,16", help="steps in flight to try behind each delay")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-runs", type=int, default=2)
    parser.add_argument("--stream-tokens", type=int, default=48)
    parser.add_argument("--max-seqs", type=int, default=16)
    args = parser.parse_args()
    plan = Plan(args.prompt_tokens, args.decode_tokens, args.decode_runs, 2, 2, args.stream_tokens, (16,))
    delays = [float(d) for d in args.delays_ms.split(",") if d]
    depths = [int(d) for d in args.depths.split(",") if d]
    started = time.time()
    results = run(plan, delays, depths, args.max_seqs)
    report = {
        "benchmark": "provider_bench",
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "wall_s": round(time.time() - started, 1),
        "command": " ".join(sys.argv),
        "plan": dataclasses.asdict(plan),
        "machine": machine_info(),
        "systems": results,
    }
    print_table(results)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
