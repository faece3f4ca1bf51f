"""The Flower ClientApp: one data owner fine-tunes LoRA adapters on its private partition.

Each client identifies itself (query) with its reward wallet, trains with DP-SGD when the job
asks for it, and keeps its privacy accountant in the node's persistent `context.state`, so the
epsilon it reports is cumulative over every round it took part in.
"""

import hashlib
import logging
from functools import lru_cache
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from train_jobs.config import FederatedJob
from train_jobs.data import TokenizedSet, load_examples, shard_indices
from train_jobs.privacy import AccountantState
from train_jobs.task import (
    add_lora,
    base_model_dir,
    load_model,
    load_trainable_state,
    train,
    trainable_state,
)

logger = logging.getLogger(__name__)

_DP_STATE_KEY = "dp-accountant"


def client_wallet(job: FederatedJob, partition: int) -> str:
    """The wallet paid for this partition: from the job, else a stable per-client Solana pubkey."""
    if job.wallets:
        return job.wallets[partition]
    from solders.keypair import Keypair

    seed = hashlib.blake2b(f"solanalm/{job.name}/client-{partition}".encode(), digest_size=32).digest()
    return str(Keypair.from_seed(seed).pubkey())


@lru_cache(maxsize=4)
def _partitions(job_json: str) -> tuple[list[TokenizedSet], TokenizedSet]:
    job = FederatedJob.model_validate_json(job_json)
    _, tokenizer = load_model(base_model_dir(job.model))
    train_set, held_out = load_examples(job.data, tokenizer)
    shards = shard_indices(train_set.texts, job.num_clients, job.sharding, seed=job.data.seed)
    return [train_set.subset(shard) for shard in shards], held_out


def client_partition(job: FederatedJob, partition: int) -> TokenizedSet:
    """The private training examples of `partition` (cached per process)."""
    return _partitions(job.model_dump_json())[0][partition]


def held_out_set(job: FederatedJob) -> TokenizedSet:
    """The held-out examples the server evaluates the global model on."""
    return _partitions(job.model_dump_json())[1]


def build_lora_model(job: FederatedJob) -> Any:
    """The base catalogue model with the job's (seeded) LoRA adapters."""
    model, _ = load_model(base_model_dir(job.model))
    return add_lora(model, job.lora, job.optim.seed)


def _load_accountant(context: Context) -> AccountantState | None:
    record = context.state.get(_DP_STATE_KEY)
    if not isinstance(record, ConfigRecord):
        return None
    return AccountantState(
        [float(x) for x in _as_list(record["noise-multipliers"])],
        [float(x) for x in _as_list(record["sample-rates"])],
        [int(x) for x in _as_list(record["steps"])],
    )


def _as_list(value: object) -> list[float | int]:
    if not isinstance(value, list) or not all(isinstance(x, int | float) for x in value):
        raise TypeError(f"corrupt privacy accountant state: {value!r}")
    return list(value)


def _store_accountant(context: Context, state: AccountantState) -> None:
    context.state[_DP_STATE_KEY] = ConfigRecord(
        {
            "noise-multipliers": state.noise_multipliers,
            "sample-rates": state.sample_rates,
            "steps": state.steps,
        }
    )


def build_client_app(job: FederatedJob) -> ClientApp:
    """A ClientApp bound to `job` (picklable closure: Flower ships it to its Ray actors)."""
    app = ClientApp()

    @app.query()
    def identify(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        identity = ConfigRecord({"wallet": client_wallet(job, partition), "partition-id": partition})
        return Message(RecordDict({"identity": identity}), reply_to=message)

    @app.train()
    def train_round(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        server_round = int(message.content["config"]["server-round"])  # type: ignore[arg-type]
        if job.client_resources.torch_threads is not None:
            torch.set_num_threads(job.client_resources.torch_threads)
        model = build_lora_model(job)
        load_trainable_state(model, message.content["arrays"].to_torch_state_dict())  # type: ignore[union-attr]
        drops = job.simulate_drops.get(server_round, [])
        result = train(
            model,
            client_partition(job, partition),
            job.optim,
            privacy=job.privacy,
            accountant=_load_accountant(context),
            stop_after=job.optim.max_steps // 2 if partition in drops else None,
            seed=job.optim.seed + 1000 * server_round + partition,
        )
        if result.accountant is not None:
            _store_accountant(context, result.accountant)
        metrics: dict[str, Any] = {
            "num-examples": result.examples,
            "train-loss": sum(result.losses[-3:]) / max(len(result.losses[-3:]), 1),
            "train-time-s": result.seconds,
            "partition-id": partition,
            "epsilon": result.epsilon or 0.0,
            "round-epsilon": result.round_epsilon or 0.0,
        }
        content = RecordDict({"arrays": ArrayRecord(trainable_state(model)), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=message)

    return app
