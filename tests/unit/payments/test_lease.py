"""The settlement lease (one runner at a time) and the settle pass that stops once it lost the lease."""

import time

import pytest
from solders.keypair import Keypair
from sqlalchemy import create_engine, update

from payments.ledger.lease import LeaseLost, SettlementLease
from payments.ledger.migrate import migrate
from payments.ledger.payouts import BatchTaken
from payments.ledger.schema import settlement_lease
from tests.unit.payments.conftest import funded_client, onchain_amount, run, serve_request


@pytest.fixture
def engine(tmp_path):  # type: ignore[no-untyped-def]
    engine = create_engine(f"sqlite:///{tmp_path / 'lease.sqlite3'}")
    migrate(engine)
    yield engine
    engine.dispose()


def _expire(engine, name: str = "settlement") -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        conn.execute(update(settlement_lease).where(settlement_lease.c.name == name).values(expires_at=0.0))


def test_one_holder_at_a_time_and_renewal_keeps_it(engine) -> None:  # type: ignore[no-untyped-def]
    a, b = SettlementLease(engine, "worker-a", 60), SettlementLease(engine, "worker-b", 60)
    assert a.acquire() and not b.acquire()
    first = a.state()
    assert first is not None and first.holder == "worker-a"
    time.sleep(0.01)
    assert a.acquire()  # a renewal moves the expiry, not the start
    renewed = a.state()
    assert renewed is not None and renewed.acquired_at == first.acquired_at and renewed.expires_at > first.expires_at
    with pytest.raises(LeaseLost, match="worker-a"):
        b.ensure()


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops(engine) -> None:  # type: ignore[no-untyped-def]
    a, b = SettlementLease(engine, "worker-a", 60), SettlementLease(engine, "worker-b", 60)
    assert a.acquire()
    _expire(engine)  # worker-a died: it renews no more
    assert b.acquire()
    state = b.state()
    assert state is not None and state.holder == "worker-b" and state.expires_at > time.time()
    with pytest.raises(LeaseLost, match="worker-b"):
        a.ensure()  # back from a pause: it must not send anything


def test_release_hands_the_lease_over_at_once_and_only_by_its_holder(engine) -> None:  # type: ignore[no-untyped-def]
    a, b = SettlementLease(engine, "worker-a", 60), SettlementLease(engine, "worker-b", 60)
    assert a.acquire()
    b.release()  # not b's to release
    assert not b.acquire()
    a.release()
    assert b.acquire()


def test_a_lease_needs_a_positive_ttl(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        SettlementLease(engine, "w", 0)


def test_settle_without_the_lease_does_nothing_and_the_holder_pays(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    payer = funded_client(service, 2_000_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(payer.pubkey()), [(provider, 30)])
    other = SettlementLease(service.ledger.engine, "another-worker", 60)
    assert other.acquire()
    report = run(service.settle())
    assert (
        report.batches_confirmed == 0 and service.book.open_batches() == [] and onchain_amount(service, provider) == 0
    )
    other.release()
    assert run(service.settle()).batches_confirmed == 1 and onchain_amount(service, provider) > 0


def test_a_pass_that_loses_its_lease_mid_way_sends_nothing_more(make_service) -> None:  # type: ignore[no-untyped-def]
    """The lease expires under the runner after it signed: a new holder took it, so the batch stays signed and
    unsent; the new holder sends it (the same signed bytes) and it is paid once."""
    taken: list[str] = []

    def steal_after_sign(step: str) -> None:
        if step == "after_sign" and not taken:
            _expire(service.ledger.engine)
            taken.append("x")
            assert SettlementLease(service.ledger.engine, "worker-b", 60).acquire()

    service = make_service(crash_hook=steal_after_sign)
    payer = funded_client(service, 2_000_000)
    provider = str(Keypair().pubkey())
    record = serve_request(service, "r1", str(payer.pubkey()), [(provider, 30)])
    report = run(service.settle())
    (batch,) = service.book.open_batches()
    assert report.batches_confirmed == 0 and batch.state == "signed" and onchain_amount(service, provider) == 0
    assert run(service.chain.signature_status(_sig(batch.signature))) is None  # never sent
    successor = make_service(section={"actor_name": service.section.actor_name})
    successor.lease = SettlementLease(successor.ledger.engine, "worker-b", 60)
    successor.settler.guard = successor.lease.ensure
    assert run(successor.settle()).batches_confirmed == 1
    assert onchain_amount(successor, provider) == record.shares[0].amount


def test_a_batch_signed_by_another_runner_cannot_be_signed_again(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    payer = funded_client(service, 2_000_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(payer.pubkey()), [(provider, 30)])
    batch = service.book.create_batch([provider])
    assert batch is not None
    service.book.mark_signed(batch.batch_id, b"tx-1", "sig-1", "hash", 10)
    with pytest.raises(BatchTaken):
        service.book.mark_signed(batch.batch_id, b"tx-2", "sig-2", "hash", 10)
    assert service.book.attempt_signatures(batch.batch_id) == ["sig-1"]


def _sig(text: str | None):  # type: ignore[no-untyped-def]
    from solders.signature import Signature

    return Signature.from_string(text or "")
