"""SecAgg+ rounds (train_jobs.fl_secagg) over an in-process loopback grid: the config's refusals, the
aggregate against the plain mean, what reaches the server per client, dropouts inside and past the
threshold, and rewards paid once per rebuilt round to the proven wallets that took part."""

import copy
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from pydantic import ValidationError

from train_jobs.config import FederatedJob, ModelRef, with_secure_aggregation
from train_jobs.fl_client import build_client_app, secagg_mod, train_round
from train_jobs.fl_secagg import SecAggRounds, run_secagg_rounds
from train_jobs.fl_server import FederatedSummary, Registration, RewardingFedAvg, run_server
from train_jobs.protocol import RoundReward

NODES = [11, 22, 33]
SHAPES = [(4, 3), (5,)]
WEIGHTS = {11: 8, 22: 16, 33: 24}  # examples each node trains on (its aggregation weight)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)  # what a ServerApp process has set
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


class LoopbackGrid:
    """A Grid that hands each message, serialised-by-copy, to one in-process ClientApp per node.
    `kill(node, stage)` makes a node vanish when that SecAgg+ stage reaches it (no reply, like a
    SuperNode killed mid-round). Every reply the server receives is kept in `received`."""

    def __init__(self, app: ClientApp, nodes: list[int]) -> None:
        self.app, self.nodes = app, nodes
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}) for node in nodes
        }
        self.dead: set[int] = set()
        self.kills: dict[int, str] = {}
        self.received: list[tuple[str, Message]] = []

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.nodes if node not in self.dead]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message = copy.deepcopy(message)
            message.metadata.__dict__["_message_id"] = str(uuid4())
            node = message.metadata.dst_node_id
            configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = str(configs[Key.STAGE]) if configs is not None else message.metadata.message_type
            if self.kills.get(node) == stage:
                self.dead.add(node)
            if node in self.dead:
                replies.append(Message(Error(code=0, reason="node offline"), reply_to=message))
                continue
            reply = copy.deepcopy(self.app(message, self.contexts[node]))
            self.received.append((stage, reply))
            replies.append(reply)
        return replies


def _update(node: int) -> list[np.ndarray]:
    rng = np.random.default_rng(node)
    return [rng.uniform(-1, 1, shape).astype(np.float32) for shape in SHAPES]


def _toy_app() -> ClientApp:
    """A ClientApp whose 'training' returns a fixed update per node, as Flower's legacy FitRes."""
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node = message.metadata.dst_node_id
        metrics = {
            "num-examples": WEIGHTS[node],
            "train-loss": float(node),
            "train-time-s": 0.1,
            "epsilon": 1.0,
            "round-epsilon": 0.5,
        }
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(_update(node)), WEIGHTS[node], metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)

    return app


class ListSink:
    def __init__(self) -> None:
        self.rewards: list[RoundReward] = []

    def record(self, rewards: Iterable[RoundReward]) -> None:
        self.rewards.extend(rewards)


def _job(**secagg: object) -> FederatedJob:
    return FederatedJob.model_validate(
        {
            "name": "secagg-unit",
            "num_clients": 3,
            "num_rounds": 2,
            "min_train_clients": 2,
            "min_available_clients": 2,
            "optim": {"batch_size": 8, "max_steps": 3},
            "secure_aggregation": {"enabled": True, "num_shares": 3, "reconstruction_threshold": 2, **secagg},
        }
    )


def _run(
    tmp_path: Path, kills: dict[int, str] | None = None, num_rounds: int = 1
) -> tuple[LoopbackGrid, list[ArrayRecord], FederatedSummary, ListSink]:
    job = _job().model_copy(update={"num_rounds": num_rounds})
    registrations = {node: Registration(node, i, wallet=f"wallet-{node}") for i, node in enumerate(NODES)}
    summary, sink = FederatedSummary(job=job.name), ListSink()
    fedavg = RewardingFedAvg(job, registrations, sink, 1000, summary, [100] * 3, tmp_path / "pending.jsonl")
    grid = LoopbackGrid(_toy_app(), NODES)
    grid.kills = kills or {}
    evaluated: list[ArrayRecord] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> None:
        evaluated.append(arrays)

    initial = ArrayRecord({"a": Array(np.zeros(SHAPES[0], np.float32)), "b": Array(np.zeros(SHAPES[1], np.float32))})
    final = run_secagg_rounds(grid, job, SecAggRounds(fedavg, grid), initial, evaluate)  # type: ignore[arg-type]
    assert list(final.keys()) == ["a", "b"]
    return grid, evaluated, summary, sink


def _tolerance(nodes: list[int]) -> float:
    """SecAgg+'s quantization error: each client quantizes weight/max_weight times its update."""
    spec = _job().secure_aggregation
    step = 2 * spec.clipping_range / spec.quantization_range
    return len(nodes) * step * spec.max_weight / sum(WEIGHTS[n] for n in nodes)


def _mean(nodes: list[int]) -> list[np.ndarray]:
    total = sum(WEIGHTS[n] for n in nodes)
    return [sum(WEIGHTS[n] * _update(n)[i] for n in nodes) / total for i in range(len(SHAPES))]


def _arrays(record: ArrayRecord) -> list[np.ndarray]:
    return [record[name].numpy() for name in ("a", "b")]


def test_aggregate_is_the_weighted_mean_and_the_server_sees_only_masked_vectors(tmp_path: Path) -> None:
    grid, evaluated, summary, sink = _run(tmp_path)
    for got, want in zip(_arrays(evaluated[-1]), _mean(NODES), strict=True):
        np.testing.assert_allclose(got, want, atol=_tolerance(NODES))
        assert np.abs(got - want).max() > 0  # it did go through quantization
    masked = [reply for stage, reply in grid.received if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(masked) == 3
    for reply in masked:
        assert all(len(record) == 0 for record in reply.content.array_records.values())  # no plain tensors
        vectors = [bytes_to_ndarray(v) for v in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        plain = _update(reply.metadata.src_node_id)
        assert [v.shape for v in vectors[1:]] == [p.shape for p in plain]  # [weight factor, *update], masked
        for vector, update in zip(vectors[1:], plain, strict=True):
            assert update.tobytes() not in vector.tobytes()
            # quantized, the update lies in [0, quantization_range); masked, it is spread over the 2**32 modulus
            assert vector.max() > 2**22 * 16
    (stats,) = summary.rounds
    assert stats.secure_aggregation and stats.aggregated and sorted(stats.completed) == [f"wallet-{n}" for n in NODES]
    assert sorted((r.round, r.wallet) for r in sink.rewards) == [(1, f"wallet-{n}") for n in NODES]
    assert {r.wallet: r.amount_lamports for r in sink.rewards} == {f"wallet-{n}": WEIGHTS[n] * 1000 for n in NODES}


def test_a_node_killed_mid_round_within_the_threshold_leaves_the_round_complete(tmp_path: Path) -> None:
    _, evaluated, summary, sink = _run(tmp_path, kills={33: Stage.COLLECT_MASKED_VECTORS}, num_rounds=2)
    first, second = summary.rounds
    assert first.aggregated and first.dropped == ["wallet-33"]
    for got, want in zip(_arrays(evaluated[1]), _mean([11, 22]), strict=True):
        np.testing.assert_allclose(got, want, atol=_tolerance([11, 22]))
    paid = {(r.round, r.wallet): r.amount_lamports for r in sink.rewards}
    assert paid[(1, "wallet-33")] == 0 and paid[(1, "wallet-11")] == 8000 and paid[(1, "wallet-22")] == 16000
    assert second.aggregated and sorted(second.selected) == ["wallet-11", "wallet-22"]  # the dead node is gone
    assert len(sink.rewards) == 5  # one record per selected wallet per round


def test_more_dropouts_than_the_threshold_tolerates_pay_nobody_and_keep_the_adapter(tmp_path: Path) -> None:
    kills = {22: Stage.COLLECT_MASKED_VECTORS, 33: Stage.COLLECT_MASKED_VECTORS}
    _, evaluated, summary, sink = _run(tmp_path, kills=kills)
    (stats,) = summary.rounds
    assert not stats.aggregated and stats.completed == []
    assert all(r.amount_lamports == 0 and r.dropped for r in sink.rewards) and len(sink.rewards) == 3
    assert all(not a.any() for a in _arrays(evaluated[-1]))  # still the initial (zero) adapter


def test_secure_aggregation_refuses_server_side_dp() -> None:
    with pytest.raises(ValidationError, match="server_dp"):
        FederatedJob.model_validate({**_job().model_dump(mode="json"), "server_dp": {"enabled": True}})


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"secure_aggregation": {"enabled": True, "num_shares": 3, "reconstruction_threshold": 3}}, "< num_shares"),
        ({"secure_aggregation": {"enabled": True, "max_weight": 10}}, "max_weight"),
        ({"secure_aggregation": {"enabled": True, "num_shares": 5, "reconstruction_threshold": 3}}, "min_train"),
        ({"secure_aggregation": {"enabled": True, "num_shares": 2}}, "greater than or equal to 3"),
        ({"secure_aggregation": {"enabled": True, "quantization_range": "many"}}, "integer"),
        ({"secure_aggregation": {"enabled": True, "typo": 1}}, "Extra inputs"),
    ],
)
def test_secure_aggregation_config_errors(update: dict[str, object], match: str) -> None:
    raw = {**_job().model_dump(mode="json"), **update}
    with pytest.raises(ValidationError, match=match):
        FederatedJob.model_validate(raw)


def test_secure_aggregation_off_accepts_server_side_dp() -> None:
    raw = {**_job().model_dump(mode="json"), "secure_aggregation": {"enabled": False}, "server_dp": {"enabled": True}}
    assert FederatedJob.model_validate(raw).server_dp.enabled


def test_a_node_refuses_a_plain_round_of_a_secure_aggregation_job() -> None:
    message = Message(
        RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"partition-id": 0, "server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(PermissionError, match="in the clear"):
        train_round(_job(), message, context)


@pytest.mark.slow  # ~30 s on the shared 2-core machine: the tiny model, 3 clients x 2 rounds of DP-SGD
def test_run_server_with_the_real_client_app_over_secagg(tmp_path: Path, tiny_ref: ModelRef) -> None:
    """`run_server` end to end: registration, two SecAgg+ rounds of the real ClientApp (tiny model,
    DP-SGD), each node in its own context; held-out loss falls, each wallet paid once per round."""
    job = FederatedJob.model_validate(
        {
            **_job().model_dump(mode="json"),
            "model": tiny_ref.model_dump(mode="json"),
            "data": {"max_length": 16, "max_examples": 36},
            "optim": {"learning_rate": 2e-2, "batch_size": 4, "max_steps": 2},
            "lora": {"r": 4, "alpha": 8},
            "privacy": {"enabled": True, "noise_multiplier": 0.5, "max_epsilon": 50},
            "client_state_dir": str(tmp_path / "clients"),
            "secure_aggregation": {"enabled": True, "max_weight": 8},
        }
    )
    grid = LoopbackGrid(build_client_app(job), NODES)
    for i, node in enumerate(NODES):
        grid.contexts[node].node_config["partition-id"] = i  # the simulated client's own number
    sink = ListSink()
    summary = run_server(grid, job, sink, 1000, tmp_path / "run")  # type: ignore[arg-type]
    first, second = summary.rounds
    assert first.secure_aggregation and second.aggregated and len(second.completed) == 3
    assert second.eval_loss is not None and summary.eval_loss_before is not None
    assert second.eval_loss < summary.eval_loss_before
    assert all(second.client_epsilon[w] > first.client_epsilon[w] > 0 for w in second.completed)
    assert sorted((r.round, r.wallet) for r in sink.rewards) == sorted((n, w) for n in (1, 2) for w in second.completed)
    assert all(0 < r.amount_lamports <= 8000 for r in sink.rewards)
    assert not [stage for stage, _ in grid.received if stage == MessageType.TRAIN]  # no update sent in the clear
    assert (tmp_path / "run" / "adapter").is_dir()


def test_the_cli_flag_turns_secure_aggregation_on_and_is_refused_with_server_dp(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from train_jobs.cli import app

    plain = {k: v for k, v in _job().model_dump(mode="json").items() if k != "secure_aggregation"}
    assert with_secure_aggregation(FederatedJob.model_validate(plain), True).secure_aggregation.enabled
    assert not with_secure_aggregation(_job(), False).secure_aggregation.enabled
    assert with_secure_aggregation(_job(), None) == _job()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**plain, "server_dp": {"enabled": True}}))
    result = CliRunner().invoke(app, ["fl-submit", "--config", str(path), "--secure-aggregation"])
    assert result.exit_code == 2 and "server_dp" in result.output
