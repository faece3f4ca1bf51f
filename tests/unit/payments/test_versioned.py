"""v0 payout transactions with lookup tables: more payouts per transaction, same guarantees."""

from collections import defaultdict

import pytest
from solders.keypair import Keypair
from solders.message import MessageV0
from solders.signature import Signature

from payments.settlement import CRASH_POINTS
from tests.unit.payments.conftest import funded_client, onchain_amount, run, serve_request
from tests.unit.payments.test_crash_recovery import SimulatedCrash, crash_at

V0 = {"use_versioned_tx": True, "batch_max_transfers": 128}


def serve_many(service, n: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
    client = funded_client(service, 10**11 if service.asset.mint is None else 10**8)
    earned: dict[str, int] = defaultdict(int)
    for i in range(n):
        wallet = str(Keypair().pubkey())
        record = serve_request(service, f"r{i}", str(client.pubkey()), [(wallet, 1)], prompt=100, completion=0)
        earned[wallet] += record.shares[0].amount
    return earned


@pytest.mark.parametrize("asset", ["sol", "spl"])
def test_v0_batches_carry_many_more_payouts(make_service, asset: str) -> None:  # type: ignore[no-untyped-def]
    price = {"prompt_per_1k": 10**7 if asset == "sol" else 1_000, "completion_per_1k": 0}
    service = make_service(section={**V0, "asset": asset, "default_price": price})
    earned = serve_many(service, 52)
    if asset == "spl":  # existing token accounts, so the batch holds transfers only
        for wallet in earned:
            run(service.faucet(wallet, 0))
    run(service.settle())
    sizes = sorted((len(b.items) for b in service.book.confirmed_batches()), reverse=True)
    assert sum(sizes) == 52 and sizes[0] >= 45, sizes
    batch = service.book.confirmed_batches()[0]
    fetched = run(service.chain.fetch_transaction(Signature.from_string(batch.signature)))
    assert isinstance(fetched.transaction.message, MessageV0) and fetched.transaction.message.address_table_lookups
    for wallet, amount in earned.items():
        assert onchain_amount(service, wallet) == amount
    assert run(service.reconcile()).ok


@pytest.mark.parametrize("point", CRASH_POINTS[1:3])
def test_v0_crash_and_restart_keeps_tables_and_pays_once(make_service, point: str) -> None:  # type: ignore[no-untyped-def]
    hook, _ = crash_at(point)
    section = {
        **V0,
        "asset": "sol",
        "default_price": {"prompt_per_1k": 10**7, "completion_per_1k": 0},
    }
    service = make_service(section=section, crash_hook=hook)
    earned = serve_many(service, 30)
    with pytest.raises(SimulatedCrash):
        run(service.settle())
    restarted = make_service(section=section)
    run(restarted.settle())
    for wallet, amount in earned.items():
        assert onchain_amount(restarted, wallet) == amount
    assert run(restarted.reconcile()).ok
