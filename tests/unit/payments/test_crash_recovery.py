"""Fault injection: the settlement is killed between each of its steps, then a fresh service
(new ledger connection, LiteSVM restored from its snapshot) recovers. Nothing lost, nothing paid
twice.
"""

from collections import defaultdict

import pytest
from solders.keypair import Keypair

from payments.settlement import CRASH_POINTS
from tests.unit.payments.conftest import funded_client, onchain_amount, run, serve_request


class SimulatedCrash(BaseException):
    """Raised by the crash hook; BaseException so no `except Exception` in the code swallows it."""


def crash_at(point: str):  # type: ignore[no-untyped-def]
    fired = []

    def hook(step: str) -> None:
        if step == point and not fired:
            fired.append(step)
            raise SimulatedCrash(step)

    return hook, fired


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_between_settlement_steps_pays_each_provider_exactly_once(make_service, point: str) -> None:  # type: ignore[no-untyped-def]
    hook, fired = crash_at(point)
    service = make_service(crash_hook=hook)
    client = funded_client(service, 5_000_000)
    providers = [str(Keypair().pubkey()) for _ in range(6)]
    earned: dict[str, int] = defaultdict(int)
    for i in range(8):
        record = serve_request(
            service,
            f"r{i}",
            str(client.pubkey()),
            [(providers[i % 6], 20), (providers[(i + 1) % 6], 10)],
        )
        for share in record.shares:
            if share.role == "provider":
                earned[share.wallet] += share.amount
    with pytest.raises(SimulatedCrash):
        run(service.settle())
    assert fired == [point]

    restarted = make_service()  # what a new actor process sees: the DB and the chain snapshot
    run(restarted.recover())
    run(restarted.settle())
    run(restarted.settle())  # a further pass must not pay again
    for wallet, amount in earned.items():
        assert onchain_amount(restarted, wallet) == amount, (point, wallet)
    assert restarted.book.unpaid() == {} and restarted.book.open_batches() == []
    report = run(restarted.reconcile())
    assert report.ok, report.checks
    assert report.details["paid_out"] == sum(earned.values())


def test_crash_after_send_then_expiry_resolves_by_status_not_by_resigning(make_service) -> None:  # type: ignore[no-untyped-def]
    hook, _ = crash_at("after_send")
    service = make_service(crash_hook=hook)
    client = funded_client(service, 1_000_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)])
    with pytest.raises(SimulatedCrash):
        run(service.settle())
    restarted = make_service()
    restarted.chain.expire_blockhash()  # the blockhash expires, but the transaction had landed
    run(restarted.settle())
    [batch] = restarted.book.confirmed_batches()
    assert batch.attempt == 1  # never re-signed
    assert onchain_amount(restarted, provider) == batch.items[0][1]
