"""Data-parallel fine-tuning: a Ray Train TorchTrainer (DDP: gloo on CPU, NCCL on GPU).

The driver tokenises the dataset, splits it with the job's sharding strategy and hands each worker
its own Ray Dataset (`train_<rank>`); workers fine-tune with `train_jobs.task`, report loss and
throughput every step and a checkpoint (an HF directory) every `checkpoint_every_steps`. After a
worker dies, FailureConfig restarts the group and training resumes from the latest checkpoint.

    ray job submit --working-dir . -- \
        python -m train_jobs.data_parallel --config configs/train/dp-tiny.yaml
"""

import argparse
import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from cluster.config.training import TrainingSection
from train_jobs.checkpoint import is_adapter, load_train_state, save_checkpoint
from train_jobs.config import DataParallelJob, load_job
from train_jobs.data import TokenizedSet, load_examples, shard_indices
from train_jobs.task import (
    add_lora,
    base_model_dir,
    causal_lm_loss,
    evaluate,
    load_model,
    make_optimizer,
)

logger = logging.getLogger(__name__)

_FAULT_MARKER = ".fault_injected"


@dataclass(frozen=True)
class DataParallelResult:
    """The outcome of a run: final metrics and where the latest checkpoint is."""

    metrics: dict[str, Any]
    checkpoint_path: Path | None
    run_dir: Path


def resolve_job(job: DataParallelJob, training: TrainingSection) -> DataParallelJob:
    """Absolute paths (workers may not share the driver's cwd) and a storage path from settings."""
    model = job.model.model_copy(update={"catalogue": job.model.catalogue.resolve()})
    data = job.data.model_copy(update={"path": job.data.path.resolve() if job.data.path else None})
    storage = job.storage_path or training.output_dir
    return job.model_copy(update={"model": model, "data": data, "storage_path": storage.resolve()})


def build_datasets(job: DataParallelJob) -> dict[str, Any]:
    """One Ray Dataset per worker rank (`train_<rank>`) plus the held-out `eval` set."""
    _, tokenizer = load_model_tokenizer_only(job)
    train, held_out = load_examples(job.data, tokenizer)
    shards = shard_indices(train.texts, job.num_workers, job.sharding, seed=job.data.seed)
    if any(not shard for shard in shards):
        raise ValueError(f"a worker got no examples ({[len(s) for s in shards]}); use fewer workers or more data")
    datasets = {f"train_{rank}": _to_ray(train.subset(shard)) for rank, shard in enumerate(shards)}
    datasets["eval"] = _to_ray(held_out)
    return datasets


def load_model_tokenizer_only(job: DataParallelJob) -> tuple[Path, Any]:
    from transformers import AutoTokenizer

    directory = base_model_dir(job.model)
    return directory, AutoTokenizer.from_pretrained(directory)


def _to_ray(data: TokenizedSet) -> Any:
    rows = [
        {"input_ids": data.input_ids[i].numpy(), "attention_mask": data.attention_mask[i].numpy()}
        for i in range(len(data))
    ]
    return ray.data.from_items(rows)


def _restore_or_build(job: DataParallelJob) -> tuple[Any, Any, dict[str, Any]]:
    """The model to train: from the latest checkpoint when resuming, else the catalogue weights."""
    base = base_model_dir(job.model)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        model, tokenizer = load_model(base)
        return (add_lora(model, job.lora, job.optim.seed) if job.lora else model), tokenizer, {}
    with checkpoint.as_directory() as raw:
        directory = Path(raw)
        state = load_train_state(directory)
        if is_adapter(directory):
            from peft import PeftModel

            model, tokenizer = load_model(base)
            model = PeftModel.from_pretrained(model, directory, is_trainable=True)
        else:
            model, tokenizer = load_model(directory)
    logger.info("resuming from step %s", state.get("step"))
    return model, tokenizer, state


def _eval_set(batch_size: int = 256) -> TokenizedSet:
    shard = ray.train.get_dataset_shard("eval")
    batches = list(shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.long))
    ids = torch.cat([b["input_ids"] for b in batches])
    return TokenizedSet(ids, torch.cat([b["attention_mask"] for b in batches]), [""] * len(ids))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every DDP worker (Ray Train): fine-tune, report per step, checkpoint periodically."""
    job = DataParallelJob.model_validate(config["job"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model, tokenizer, state = _restore_or_build(job)
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(model, job.optim)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    held_out = _eval_set()
    eval_before = state.get("eval_loss_before", evaluate(raw_model, held_out))
    step, resumed_from = int(state.get("step", 0)), int(state.get("step", 0))
    torch.manual_seed(job.optim.seed + rank + step)
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    total_samples, total_s = 0, 0.0  # since this (re)start; step time includes DDP's all-reduce
    while step < job.optim.max_steps:
        for batch in shard.iter_torch_batches(batch_size=job.optim.batch_size, dtypes=torch.long):
            model.train()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = causal_lm_loss(model, batch["input_ids"], batch["attention_mask"])
            loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - started
            step += 1
            total_samples += len(batch["input_ids"]) * world
            total_s += seconds
            metrics = {
                "step": step,
                "loss": loss.item(),
                "step_s": seconds,
                "world_size": world,
                "samples_per_s": len(batch["input_ids"]) * world / seconds,
                "mean_samples_per_s": total_samples / total_s,
                "eval_loss_before": eval_before,
                "resumed_from_step": resumed_from,
            }
            last = step >= job.optim.max_steps
            if last:
                metrics["eval_loss"] = evaluate(raw_model, held_out)
            _maybe_die(job, rank, step)
            _report(
                job,
                metrics,
                raw_model,
                tokenizer,
                optimizer,
                rank,
                with_checkpoint=last or step % job.checkpoint_every_steps == 0,
            )
            if last:
                break


def _report(
    job: DataParallelJob,
    metrics: dict[str, Any],
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    rank: int,
    with_checkpoint: bool,
) -> None:
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    if rank != 0:
        ray.train.report(metrics)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            train_state = {
                "step": metrics["step"],
                "optimizer": optimizer.state_dict(),
                "eval_loss_before": metrics["eval_loss_before"],
            }
            save_checkpoint(Path(tmp), model, tokenizer, train_state, job.model_dump(mode="json"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    # Commit barrier: the controller collects reports by polling, so a checkpoint reported just
    # before a crash could be lost. Waiting until it is registered makes "resume from the last
    # checkpoint" exact, at the cost of one controller round-trip per checkpoint.
    ray.train.get_all_reported_checkpoints()


def _maybe_die(job: DataParallelJob, rank: int, step: int) -> None:
    fault = job.fault_injection
    if fault is None or fault.rank != rank or fault.at_step != step or job.storage_path is None:
        return
    marker = job.storage_path / job.name / _FAULT_MARKER
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {rank} at step {step}\n")
    logger.warning("fault injection: SIGKILL rank %d at step %d", rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(job: DataParallelJob, training: TrainingSection) -> Any:
    """The TorchTrainer for `job` (datasets built, run/checkpoint/failure configs set)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job = resolve_job(job, training)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        datasets=build_datasets(job),
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker reads only its own train_<rank>
        run_config=RunConfig(
            name=job.name,
            storage_path=str(job.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=job.num_to_keep),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
    )


def run_data_parallel(job: DataParallelJob, training: TrainingSection) -> DataParallelResult:
    """Fit the job on the connected Ray cluster and return its final metrics and checkpoint."""
    trainer = build_trainer(job, training)
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {job.name} failed") from result.error
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    storage = (job.storage_path or training.output_dir).resolve()
    return DataParallelResult(
        metrics=dict(result.metrics or {}), checkpoint_path=checkpoint, run_dir=storage / job.name
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m train_jobs.data_parallel --config configs/train/<name>.yaml` (ray job submit)."""
    from cluster.config import load_settings
    from train_jobs.ray_connect import connect

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="Job YAML (configs/train/*.yaml).")
    parser.add_argument("--settings", type=Path, default=None, help="Optional settings YAML.")
    parser.add_argument("--num-workers", type=int, default=None, help="Override num_workers.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    settings = load_settings(args.settings)
    job = load_job(args.config, DataParallelJob, num_workers=args.num_workers)
    connect(settings.ray)
    try:
        result = run_data_parallel(job, settings.training)
        logger.info("finished: %s, checkpoint %s", result.metrics, result.checkpoint_path)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
