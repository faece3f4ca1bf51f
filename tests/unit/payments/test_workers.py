"""Several payments workers: the settings that allow them, and the client that spreads calls over them."""

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError
from ray.exceptions import ActorDiedError

from cluster.config.payments import PaymentsSection
from cluster.config.serving import HttpSection
from payments.client import PaymentsClient, PaymentsUnavailable
from payments.errors import InsufficientBalance

PG = "postgresql+psycopg://ledger@db:5432/ledger"


def test_more_than_one_worker_on_sqlite_is_refused_with_the_reason(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match="SQLite, one file on one machine with one writer.*database_url"):
        PaymentsSection(state_dir=tmp_path, workers=2)
    with pytest.raises(ValidationError, match="SQLite"):
        PaymentsSection(state_dir=tmp_path, workers=2, database_url="sqlite:////tmp/x.sqlite3")
    section = PaymentsSection(state_dir=tmp_path, workers=3, database_url=PG)
    names = [section.worker_actor_name(i) for i in range(3)]
    assert names == ["solanalm-payments", "solanalm-payments-1", "solanalm-payments-2"]
    with pytest.raises(ValueError):
        section.worker_actor_name(3)


def test_gateway_replicas_is_a_bounded_setting() -> None:
    assert HttpSection().gateway_replicas == 1 and HttpSection(gateway_replicas=4).gateway_replicas == 4
    with pytest.raises(ValidationError):
        HttpSection(gateway_replicas=0)


class _Method:
    def __init__(self, worker: "_Worker", name: str) -> None:
        self.worker, self.name = worker, name

    def remote(self, *args: Any) -> Any:
        return self.worker.call(self.name, *args)


class _Worker:
    """Stands in for an actor handle: `handle.method.remote(...)` returns an awaitable."""

    def __init__(self, index: int, dead: bool = False, error: Exception | None = None) -> None:
        self.index, self.dead, self.error, self.calls = index, dead, error, []  # type: ignore[var-annotated]

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)

    async def call(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        if self.dead:
            raise ActorDiedError()
        if self.error is not None:
            raise self.error
        return self.index


def test_calls_go_round_robin_over_the_workers() -> None:
    workers = [_Worker(0), _Worker(1), _Worker(2)]
    client = PaymentsClient(workers, 5.0)
    served = [asyncio.run(client.balance("w")) for _ in range(6)]
    assert served == [0, 1, 2, 0, 1, 2]


def test_a_dead_worker_is_skipped_and_idempotent_calls_retry_on_another() -> None:
    dead, alive = _Worker(0, dead=True), _Worker(1)
    client = PaymentsClient([dead, alive], 5.0)
    assert asyncio.run(client.report_usage(object())) == 1  # type: ignore[arg-type]
    assert [asyncio.run(client.balance("w")) for _ in range(3)] == [1, 1, 1]  # skipped while marked dead
    assert dead.calls == ["report_usage"]


def test_a_hold_is_not_placed_twice_when_its_worker_died_mid_call() -> None:
    dead, alive = _Worker(0, dead=True), _Worker(1)
    client = PaymentsClient([dead, alive], 5.0)
    with pytest.raises(PaymentsUnavailable):
        asyncio.run(client.place_hold(object()))  # type: ignore[arg-type]
    assert alive.calls == []


def test_a_payment_error_is_not_retried_elsewhere() -> None:
    from ray.exceptions import RayTaskError

    refusal = RayTaskError("balance", "tb", InsufficientBalance("no"))
    first, second = _Worker(0, error=refusal), _Worker(1)
    client = PaymentsClient([first, second], 5.0)
    with pytest.raises(InsufficientBalance):
        asyncio.run(client.report_usage(object()))  # type: ignore[arg-type]
    assert second.calls == []
