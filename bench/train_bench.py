"""Training benchmark: held-out loss with DP off/on, DDP samples/s, federated rounds.

    python bench/train_bench.py --out bench-train.json            # tiny model, ~3-4 min on 2 cores
    python bench/train_bench.py --model smollm2-135m-instruct --parts local

Prints one JSON document (also written to --out). Starts a local Ray head unless --address is given.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cluster.config import load_settings
from train_jobs.config import (
    ClientResources,
    DataParallelJob,
    DataSpec,
    FederatedJob,
    LoraSpec,
    ModelRef,
    OptimSpec,
    PrivacySpec,
)
from train_jobs.data import load_examples
from train_jobs.task import add_lora, base_model_dir, evaluate, load_model, train

LORA = LoraSpec(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def local_dp_off_on(ref: ModelRef, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Same LoRA fine-tune (same data, steps, seed) without and with DP-SGD."""
    rows = []
    for enabled in (False, True):
        model, tokenizer = load_model(base_model_dir(ref))
        model = add_lora(model, LORA)
        train_set, held_out = load_examples(DataSpec(max_length=args.max_length), tokenizer)
        privacy = PrivacySpec(enabled=enabled, noise_multiplier=args.noise, max_grad_norm=1.0, delta=args.delta)
        before = evaluate(model, held_out)
        optim = OptimSpec(learning_rate=args.lr, batch_size=args.batch_size, max_steps=args.steps)
        result = train(model, train_set, optim, privacy=privacy)
        rows.append(
            {
                "dp": enabled,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "train_examples": len(train_set),
                "held_out_examples": len(held_out),
                "eval_loss_before": before,
                "eval_loss_after": evaluate(model, held_out),
                "epsilon": result.epsilon,
                "delta": args.delta if enabled else None,
                "noise_multiplier": args.noise if enabled else None,
                "max_grad_norm": 1.0 if enabled else None,
                "train_s": result.seconds,
            }
        )
    return rows


def ddp_scaling(ref: ModelRef, args: argparse.Namespace, storage: Path) -> list[dict[str, Any]]:
    """samples/s of the Ray Train job, 1 and 2 workers (full fine-tune, gloo, 1 thread each)."""
    from train_jobs.data_parallel import run_data_parallel

    settings = load_settings()
    rows = []
    for workers in (1, 2):
        job = DataParallelJob(
            name=f"bench-ddp-{workers}",
            model=ref,
            data=DataSpec(max_length=args.max_length),
            optim=OptimSpec(learning_rate=3e-3, batch_size=args.batch_size, max_steps=args.ddp_steps),
            num_workers=workers,
            checkpoint_every_steps=args.ddp_steps,
            storage_path=storage,
        )
        started = time.perf_counter()
        result = run_data_parallel(job, settings.training)
        metrics = result.metrics
        rows.append(
            {
                "workers": workers,
                "steps": metrics["step"],
                "per_worker_batch": args.batch_size,
                "mean_samples_per_s": metrics["mean_samples_per_s"],
                "eval_loss_before": metrics["eval_loss_before"],
                "eval_loss_after": metrics["eval_loss"],
                "wall_s_including_startup": time.perf_counter() - started,
            }
        )
    return rows


def federated(ref: ModelRef, args: argparse.Namespace, storage: Path) -> dict[str, Any]:
    """3 clients x N rounds with DP-SGD: round and per-client time, cumulative epsilon."""
    from train_jobs.federated import run_federated

    job = FederatedJob(
        name="bench-fl",
        model=ref,
        data=DataSpec(max_length=args.max_length),
        optim=OptimSpec(learning_rate=2e-2, batch_size=args.batch_size, max_steps=args.fl_steps),
        lora=LORA,
        privacy=PrivacySpec(enabled=True, noise_multiplier=args.noise, max_grad_norm=1.0, delta=args.delta),
        num_clients=3,
        num_rounds=args.rounds,
        min_train_clients=3,
        min_available_clients=3,
        client_resources=ClientResources(num_cpus=8, torch_threads=1),
        storage_path=storage,
    )
    summary = run_federated(job, load_settings(training={"reward_sink": "jsonl"}))
    return {
        "clients": 3,
        "steps_per_round": args.fl_steps,
        "eval_loss_before": summary["eval_loss_before"],
        "rounds": [
            {
                "round": r["round"],
                "round_s": r["round_time_s"],
                "client_s": r["client_time_s"],
                "eval_loss": r["eval_loss"],
                "max_epsilon_cumulative": max(r["client_epsilon"].values()),
                "delta": args.delta,
            }
            for r in summary["rounds"]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="Catalogue model name.")
    parser.add_argument("--parts", default="local,ddp,fl", help="Comma list of local, ddp, fl.")
    parser.add_argument("--steps", type=int, default=40, help="Local fine-tune steps (DP off/on).")
    parser.add_argument("--ddp-steps", type=int, default=20)
    parser.add_argument("--fl-steps", type=int, default=8, help="Local steps per client per round.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--noise", type=float, default=0.8, help="DP-SGD noise multiplier.")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local head).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(1)
    ref = ModelRef(name=args.model)
    report: dict[str, Any] = {
        "model": args.model,
        "machine": {
            "cpus": torch.get_num_threads() and __import__("os").cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    if "local" in parts:
        report["local_dp_off_on"] = local_dp_off_on(ref, args)
    with tempfile.TemporaryDirectory() as tmp:
        if parts & {"ddp", "fl"}:
            import ray

            ray.init(
                address=args.address,
                num_cpus=None if args.address else 16,
                include_dashboard=False,
                log_to_driver=False,
            )
        if "ddp" in parts:
            report["ddp_scaling"] = ddp_scaling(ref, args, Path(tmp))
        if "fl" in parts:  # last: Flower disconnects from Ray when it ends
            report["federated"] = federated(ref, args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
