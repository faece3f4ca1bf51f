"""Run a federated job: Flower's simulation engine on the (running) Ray cluster.

The simulation attaches to the cluster this process is connected to (`settings.ray.address`), builds
a pool of ClientApp actors sized by the job's `client_resources`, and runs the ServerApp in this
process. Flower shuts its Ray connection down at the end, so tests run this module in a subprocess
that connects to the shared cluster (`--ray-address`).

    python -m train_jobs.federated --config configs/train/fl-tiny-dp.yaml
"""

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import ray

from cluster.config import Settings
from train_jobs.config import FederatedJob, load_job
from train_jobs.fl_client import build_client_app
from train_jobs.fl_server import SUMMARY_FILE, build_server_app, privacy_report
from train_jobs.protocol import make_reward_sink
from train_jobs.ray_connect import connect

logger = logging.getLogger(__name__)


def run_dir(job: FederatedJob, settings: Settings) -> Path:
    """Where the job writes adapter/, summary.json (and rewards.jsonl when payments is off)."""
    return ((job.storage_path or settings.training.output_dir) / job.name).resolve()


def resolve_job(job: FederatedJob, out: Path | None = None) -> FederatedJob:
    """Absolute paths: ClientApp actors do not share this process's working directory. With the run
    directory `out`, simulated clients keep their state (generated keypairs) in `out/clients`."""
    model = job.model.model_copy(update={"catalogue": job.model.catalogue.resolve()})
    data = job.data.model_copy(update={"path": job.data.path.resolve() if job.data.path else None})
    keypairs = [path.resolve() for path in job.client_keypairs]
    state_dir = job.client_state_dir or (out / "clients" if out is not None else None)
    update = {"model": model, "data": data, "client_keypairs": keypairs, "client_state_dir": state_dir}
    return job.model_copy(update=update)


def backend_config(job: FederatedJob) -> dict[str, Any]:
    """Flower's Ray backend config: per-client resources from the job (they size the pool), raised where
    the connected cluster's free CPUs could not hold the pool Flower would make (`fitting_cpus`)."""
    cpus = job.client_resources.num_cpus
    if ray.is_initialized():
        fitted = fitting_cpus(cpus, cpu_per_node())
        if fitted != cpus:
            logger.warning(
                "client_resources.num_cpus %s -> %s: Flower sizes its actor pool from the cluster's total CPUs,"
                " and other work (serving replicas) holds some of them now",
                cpus,
                fitted,
            )
        cpus = fitted
    return {
        "client_resources": {
            "num_cpus": cpus,
            "num_gpus": job.client_resources.num_gpus,
        },  # torch_threads is ours, applied inside the ClientApp
        "init_args": {"include_dashboard": False},
    }


def fitting_cpus(wanted: float, nodes: list[tuple[float, float]]) -> float:
    """CPUs per client with which Flower's actor pool fits the CPUs free now: `wanted`, else the smallest
    whole number above it that does. Flower makes floor(total / cpus) actors per node, from each node's
    *total* CPUs, and waits for all of them, so where serving replicas hold CPUs a pool sized by the totals
    never starts and the run hangs. `nodes`: (total, free) CPUs of each node."""
    nodes = [(total, free) for total, free in nodes if total > 0]

    def fits(cpus: float) -> bool:
        actors = [math.floor(total / cpus + 1e-9) for total, _ in nodes]
        return sum(actors) > 0 and all(n * cpus <= free + 1e-9 for n, (_, free) in zip(actors, nodes, strict=True))

    candidates = [wanted, *range(math.ceil(wanted), int(max((t for t, _ in nodes), default=0)) + 1)]
    for cpus in candidates:
        if cpus > 0 and fits(cpus):
            return cpus
    free = sum(f for _, f in nodes)
    raise RuntimeError(f"no CPU is free for a federated client ({free:g} free of the cluster's CPUs)")


def cpu_per_node() -> list[tuple[float, float]]:
    """(total, free) CPUs of each live node of the connected cluster."""
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    return [
        (float(node["Resources"].get("CPU", 0.0)), float(free.get(node["NodeID"], {}).get("CPU", 0.0)))
        for node in ray.nodes()
        if node.get("Alive") and node.get("Resources")
    ]


def run_federated(job: FederatedJob, settings: Settings) -> dict[str, Any]:
    """Run all rounds and return the summary (also in `run_dir(job)/summary.json`).

    Connects to `settings.ray.address` when not yet connected; note Flower disconnects from Ray
    (`ray.shutdown()`) when the simulation ends.
    """
    from flwr.simulation import run_simulation

    out = run_dir(job, settings)
    job = resolve_job(job, out)
    out.mkdir(parents=True, exist_ok=True)
    connect(settings.ray)
    sink = make_reward_sink(settings.training, settings.ray.namespace, jsonl_path=out / "rewards.jsonl")
    logger.info("privacy parameters in use: %s", json.dumps(privacy_report(job)))
    server_app = build_server_app(job, sink, settings.training.reward_lamports_per_example, out)
    run_simulation(
        server_app=server_app,
        client_app=build_client_app(job),
        num_supernodes=job.num_clients,
        backend_config=backend_config(job),  # type: ignore[arg-type]
    )
    summary_path = out / SUMMARY_FILE
    if not summary_path.exists():
        raise RuntimeError(f"federated run {job.name} ended without a summary (see Flower's log)")
    return dict(json.loads(summary_path.read_text()))


def main(argv: list[str] | None = None) -> None:
    """`python -m train_jobs.federated --config configs/train/<name>.yaml [--ray-address ADDR]`."""
    from cluster.config import load_settings

    parser = argparse.ArgumentParser(description="Flower federated fine-tune on the Ray cluster")
    parser.add_argument("--config", required=True, type=Path, help="Job YAML (configs/train/*.yaml).")
    parser.add_argument("--settings", type=Path, default=None, help="Optional settings YAML.")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to attach to (default: settings).")
    parser.add_argument("--namespace", default=None, help="Ray namespace (default: settings).")
    parser.add_argument("--storage-path", type=Path, default=None, help="Override the job's storage_path.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    ray_overrides = {k: v for k, v in {"address": args.ray_address, "namespace": args.namespace}.items() if v}
    settings = load_settings(args.settings, ray=ray_overrides)
    job = load_job(args.config, FederatedJob, storage_path=args.storage_path)
    summary = run_federated(job, settings)
    print(
        json.dumps(
            {
                "summary": str(run_dir(job, settings) / SUMMARY_FILE),
                "rounds": len(summary["rounds"]),
            }
        )
    )


if __name__ == "__main__":
    main()
