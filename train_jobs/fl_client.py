"""The Flower ClientApp: one data owner fine-tunes LoRA adapters on its private partition.

Each client answers the server's registration (query) with its reward wallet and a signature over
the server's nonce (`train_jobs.wallets`), trains the partition the server assigned it, with DP-SGD
when the job asks for it, and keeps its privacy accountant in the node's persistent `context.state`,
so the epsilon it reports is cumulative over every round it took part in.

The same ClientApp runs in Flower's simulation (virtual clients share the job's dataset, each trains
the partition the server assigns) and on a provider's own SuperNode (`solanalm provider train`): there
the node config names the provider's data directory (`data-dir`, its `*.jsonl` / `*.txt` files, all used
for training; they never leave the machine) and its wallet keypair (`wallet`).
"""

import contextlib
import logging
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from solders.keypair import Keypair

from cluster.network.wallet import load_keypair
from train_jobs.config import FederatedJob
from train_jobs.data import TokenizedSet, format_record, load_examples, load_records, shard_indices, tokenize
from train_jobs.privacy import AccountantState, check_budget, poisson_sample_rate
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


DATA_DIR_KEY = "data-dir"  # node config of a provider's SuperNode: its own data directory
WALLET_KEY = "wallet"  # ... and its wallet keypair file


@lru_cache(maxsize=4)
def _local_examples(job_json: str, data_dir: str) -> TokenizedSet:
    job = FederatedJob.model_validate_json(job_json)
    files = sorted(p for p in Path(data_dir).expanduser().iterdir() if p.suffix in (".jsonl", ".txt"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl or *.txt examples in {data_dir}")
    records = [record for path in files for record in load_records(path)]
    _, tokenizer = load_model(base_model_dir(job.model))
    texts = [format_record(record, tokenizer, job.data.prompt_format) for record in records]
    return tokenize(texts, tokenizer, job.data.max_length)


def local_examples(job: FederatedJob, data_dir: str | Path) -> TokenizedSet:
    """A provider's own training examples: every `*.jsonl` / `*.txt` in `data_dir` (cached per process)."""
    return _local_examples(job.model_dump_json(), str(data_dir))


def node_examples(job: FederatedJob, context: Context, partition: int) -> TokenizedSet:
    """What this node trains on: its own data directory on a SuperNode, else the assigned partition."""
    data_dir = context.node_config.get(DATA_DIR_KEY)
    return local_examples(job, str(data_dir)) if data_dir else client_partition(job, partition)


def node_keypair(job: FederatedJob, context: Context) -> Keypair:
    """This node's reward wallet: the SuperNode's `wallet` file, else the simulated client's own."""
    wallet = context.node_config.get(WALLET_KEY)
    if wallet:
        return load_keypair(Path(str(wallet)).expanduser())
    # client-N: the simulated client's own number (its data partition is whatever the server assigns)
    return client_keypair_for(job, int(context.node_config["partition-id"]))


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


def identify(job: FederatedJob, message: Message, context: Context) -> Message:
    """Registration: sign the server's nonce with this node's reward wallet."""
    challenge = challenge_from_record(message.content["challenge"])  # type: ignore[arg-type]
    if challenge.job != job.name:
        raise ValueError(f"registration for job {challenge.job!r}, this client runs {job.name!r}")
    wallet, signature = sign_challenge(node_keypair(job, context), challenge)
    identity = ConfigRecord({"wallet": wallet, "signature": signature})
    return Message(RecordDict({"identity": identity}), reply_to=message)


def train_round(job: FederatedJob, message: Message, context: Context) -> Message:
    """One round: load the global adapter, train on this node's examples (DP-SGD if asked), reply.

    Under secure aggregation the round arrives as Flower's legacy FitIns records inside the SecAgg+
    protocol (`secagg_mod` wraps this handler and masks the reply); a plain round for such a job is
    refused, so this node's update never leaves it in the clear."""
    if job.secure_aggregation.enabled and RECORD_KEY_CONFIGS not in message.content.config_records:
        raise PermissionError(f"job {job.name} uses secure aggregation: refusing to send an update in the clear")
    round_file = context.node_config.get("round-file")
    with _holding(Path(str(round_file)) if round_file else None):
        if job.secure_aggregation.enabled:
            return _train_round_secagg(job, message, context)
        config = message.content["config"]
        state, metrics = _train(job, message.content["arrays"].to_torch_state_dict(), config, context)  # type: ignore[union-attr]
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=message)


def _train_round_secagg(job: FederatedJob, message: Message, context: Context) -> Message:
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)  # legacy Parameters: the adapter's tensors, in order
    trained, metrics = _train(job, arrays, ConfigRecord(dict(fitins.config)), context)  # type: ignore[arg-type]
    # the aggregation weight: never more than a round credits (SecAgg+ overflows past max_weight)
    weight = min(int(metrics["num-examples"]), job.optim.max_steps * job.optim.batch_size)
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([tensor.detach().cpu().numpy() for tensor in trained.values()]),
        num_examples=weight,
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)


def named_state(model: Any, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Unnamed adapter tensors (Flower's legacy Parameters) named in `trainable_state(model)`'s order."""
    names = list(trainable_state(model))
    if len(arrays) != len(names):
        raise ValueError(f"global adapter has {len(arrays)} tensors, this model {len(names)}")
    return {name: torch.from_numpy(np.array(array, copy=True)) for name, array in zip(names, arrays, strict=True)}


def _train(
    job: FederatedJob,
    global_state: dict[str, torch.Tensor] | list[np.ndarray],
    config: ConfigRecord,
    context: Context,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    partition = int(config["partition-id"])  # type: ignore[arg-type]  # the server assigns it
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    threads = _threads(job.client_resources.torch_threads, context.node_config.get("torch-threads"))
    if threads is not None:
        torch.set_num_threads(threads)
    model = build_lora_model(job)
    load_trainable_state(model, global_state if isinstance(global_state, dict) else named_state(model, global_state))
    drops = job.simulate_drops.get(server_round, [])
    examples, spent = node_examples(job, context, partition), _load_accountant(context)
    # the data owner's own guard: never train past its budget, whatever the server asks
    check_budget(spent, job.privacy, poisson_sample_rate(len(examples), job.optim.batch_size), job.optim.max_steps)
    result = train(
        model,
        examples,
        job.optim,
        privacy=job.privacy,
        accountant=spent,
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
    return trainable_state(model), metrics


def _threads(job_threads: int | None, node_cap: object) -> int | None:
    """The job's torch threads under the node's own cap (a hybrid provider keeps the rest for serving)."""
    if not isinstance(node_cap, int | float | str) or node_cap == "":
        return job_threads
    cap = max(1, int(node_cap))
    return cap if job_threads is None else min(job_threads, cap)


@contextlib.contextmanager
def _holding(path: Path | None) -> Iterator[None]:
    """`path` exists while the block runs: the node's mode switch waits for the round to end."""
    if path is None:
        yield
        return
    path.touch()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def secagg_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for the SecAgg+ protocol's messages (they carry its config record);
    every other message (registration, plain rounds) goes straight to the handler."""
    if message.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def build_client_app(job: FederatedJob) -> ClientApp:
    """A ClientApp bound to `job` (picklable closure: Flower ships it to its Ray actors)."""
    app = ClientApp(mods=[secagg_mod])

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return identify(job, message, context)

    @app.train()
    def train_message(message: Message, context: Context) -> Message:
        return train_round(job, message, context)

    return app
