"""The Flower ClientApp: one data owner fine-tunes LoRA adapters on its private partition.

Each client answers the server's registration (query) with its reward wallet and a signature over
the server's nonce (`train_jobs.wallets`), trains the partition the server assigned it, with DP-SGD
when the job asks for it, and keeps its privacy accountant in the node's persistent `context.state`,
so the epsilon it reports is cumulative over every round it took part in.
"""

import logging
from functools import lru_cache
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from solders.keypair import Keypair

from cluster.network.wallet import load_keypair
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
from train_jobs.wallets import RewardWalletChallenge, client_keypair, sign_challenge

logger = logging.getLogger(__name__)

_DP_STATE_KEY = "dp-accountant"


def client_keypair_for(job: FederatedJob, client: int) -> Keypair:
    """Client `client`'s reward keypair: the configured file, else one generated in its state dir."""
    if job.client_keypairs:
        return load_keypair(job.client_keypairs[client])
    if job.client_state_dir is None:
        raise ValueError(f"job {job.name}: no client_keypairs and no client_state_dir to keep generated ones")
    return client_keypair(job.client_state_dir / f"client-{client}")


def client_wallet(job: FederatedJob, client: int) -> str:
    """The wallet client `client` is paid to (the public key of `client_keypair_for`)."""
    return str(client_keypair_for(job, client).pubkey())


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


def partition_sizes(job: FederatedJob) -> list[int]:
    """Examples in each partition, by partition id (what the server pays from)."""
    return [len(shard) for shard in _partitions(job.model_dump_json())[0]]


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


def challenge_to_record(challenge: RewardWalletChallenge) -> ConfigRecord:
    """The registration challenge as the server sends it (no wallet yet)."""
    return ConfigRecord(
        {
            "job": challenge.job,
            "node-id": str(challenge.node_id),
            "partition-id": challenge.partition,
            "nonce": challenge.nonce,
            "issued-at": challenge.issued_at,
            "expires-at": challenge.expires_at,
        }
    )


def challenge_from_record(record: ConfigRecord) -> RewardWalletChallenge:
    """The client side of `challenge_to_record`."""
    return RewardWalletChallenge(
        job=str(record["job"]),
        node_id=int(str(record["node-id"])),
        partition=int(record["partition-id"]),  # type: ignore[arg-type]
        nonce=str(record["nonce"]),
        issued_at=float(record["issued-at"]),  # type: ignore[arg-type]
        expires_at=float(record["expires-at"]),  # type: ignore[arg-type]
    )


def build_client_app(job: FederatedJob) -> ClientApp:
    """A ClientApp bound to `job` (picklable closure: Flower ships it to its Ray actors)."""
    app = ClientApp()

    @app.query()
    def identify(message: Message, context: Context) -> Message:
        challenge = challenge_from_record(message.content["challenge"])  # type: ignore[arg-type]
        if challenge.job != job.name:
            raise ValueError(f"registration for job {challenge.job!r}, this client runs {job.name!r}")
        # client-N: the simulated client's own number (its data partition is whatever the server assigns)
        keypair = client_keypair_for(job, int(context.node_config["partition-id"]))
        wallet, signature = sign_challenge(keypair, challenge)
        identity = ConfigRecord({"wallet": wallet, "signature": signature})
        return Message(RecordDict({"identity": identity}), reply_to=message)

    @app.train()
    def train_round(message: Message, context: Context) -> Message:
        config = message.content["config"]
        partition = int(config["partition-id"])  # type: ignore[arg-type,index]  # the server assigns it
        server_round = int(config["server-round"])  # type: ignore[arg-type,index]
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
