"""The money path under attack (issue 18): payee wallets, unpayable lines, deposits, payout re-signing.

(a) usage with a malformed / off-curve / program payee: the share goes to the network, the payer pays
    the same price, settle passes keep paying everyone else;
(b) a batch with one unpayable line: the rest is paid in the same pass, the line is quarantined and
    the next pass sends no transaction for it;
(c) a treasury-signed transfer is not a deposit; (d) relaying is refused on the rpc backend;
(e) a lagging RPC node (signature "not found", block height far ahead) does not re-sign a batch that
    landed.
"""

import base64

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from solders.account import Account
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import get_associated_token_address

from cluster.openai_errors import install_border_errors
from payments.chain.base import SignatureStatus
from payments.chain.litesvm_backend import LiteSVMBackend
from payments.errors import DepositRejected, InvalidRequest
from payments.http import build_router
from payments.pricing import Price, request_cost
from payments.protocol import DepositRequest
from tests.fakes.payments import LocalPaymentsClient
from tests.unit.payments.conftest import deposit_tx, funded_client, onchain_amount, run, serve_request
from tests.unit.payments.test_crash_recovery import SimulatedCrash, crash_at

BAD_PAYEES = {
    "k8s label": "unset",
    "placeholder": "unregistered-node-3",
    "off curve (a PDA)": str(Pubkey.find_program_address([b"vault"], TOKEN_PROGRAM_ID)[0]),
    "program id": str(TOKEN_PROGRAM_ID),
}


def sent_transactions(service) -> int:  # type: ignore[no-untyped-def]
    return len(service.chain._txs)


@pytest.mark.parametrize("bad", list(BAD_PAYEES.values()), ids=list(BAD_PAYEES))
def test_bad_payee_share_goes_to_the_network_and_everyone_else_is_paid(make_service, bad: str) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 1_000_000)
    good = str(Keypair().pubkey())
    record = serve_request(service, "r1", str(client.pubkey()), [(good, 10), (bad, 6)])
    price = service.ledger.price_of("m")
    assert record.cost == request_cost(Price(price.prompt_per_1k, price.completion_per_1k), 100, 200)
    assert service.balance(str(client.pubkey())).available == 1_000_000 - record.cost  # same price
    assert bad not in {s.wallet for s in record.shares}
    redirected = [s for s in record.shares if s.role == "network" and s.layers_served == 6]
    assert len(redirected) == 1 and redirected[0].amount > 0
    serve_request(service, "r2", str(client.pubkey()), [(good, 16)])
    report = run(service.settle())
    assert report.batches_confirmed == 1
    assert onchain_amount(service, good) > 0 and service.book.unpaid() == {}
    assert run(service.reconcile()).ok


def test_bad_proxy_wallet_is_redirected_too(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 1_000_000)
    record = serve_request(service, "r1", str(client.pubkey()), [(str(Keypair().pubkey()), 4)], proxy="unset")
    assert {s.role for s in record.shares} == {"provider", "network"}
    run(service.settle())
    assert run(service.reconcile()).ok


def test_treasury_as_payee_is_kept_by_the_network_not_paid_to_itself(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 1_000_000)
    record = serve_request(service, "r1", str(client.pubkey()), [(str(service.treasury.pubkey()), 4)])
    assert [s.role for s in record.shares] == ["network", "network"]
    before = sent_transactions(service)
    run(service.settle())
    assert sent_transactions(service) == before and run(service.reconcile()).ok


def plant_unpayable_ata(service, wallet: Pubkey) -> None:  # type: ignore[no-untyped-def]
    """An account owned by some other program sits at the payee's token account address."""
    ata = get_associated_token_address(wallet, service.asset.mint)
    service.chain.svm.set_account(ata, Account(10**7, bytes(165), Keypair().pubkey(), False, 0))


def test_unpayable_line_is_quarantined_and_the_rest_of_its_batch_is_paid(make_service) -> None:  # type: ignore[no-untyped-def]
    # SPL: on-curve payees whose token account cannot be created. (A SOL transfer to an on-curve
    # address fails only for the builtin and sysvar ids, which payee checks refuse already.)
    service = make_service()
    client = funded_client(service, 10**7)
    goods = [str(Keypair().pubkey()) for _ in range(3)]
    victim = Keypair().pubkey()
    plant_unpayable_ata(service, victim)
    for i, wallet in enumerate([*goods, str(victim)]):
        serve_request(service, f"r{i}", str(client.pubkey()), [(wallet, 1)])
    owed = service.book.unpaid()[str(victim)]
    before_victim = onchain_amount(service, str(victim))
    before = sent_transactions(service)
    report = run(service.settle())
    for wallet in goods:
        assert onchain_amount(service, wallet) > 0, "the rest of the batch is paid in the same pass"
    assert report.payouts_confirmed == 3
    assert sent_transactions(service) - before == 2  # the failed batch and the rest, re-batched
    pending = service.pending()
    assert [q["wallet"] for q in pending["quarantined"]] == [str(victim)]
    assert pending["quarantined"][0]["unpaid"] == owed and pending["quarantined"][0]["failures"] == 1
    # The next passes send nothing for the quarantined line (no fees burnt every pass).
    after_first = sent_transactions(service)
    run(service.settle())
    run(service.settle())
    assert sent_transactions(service) == after_first
    assert onchain_amount(service, str(victim)) == before_victim and service.book.unpaid() == {str(victim): owed}
    assert run(service.reconcile()).ok
    # The operator un-quarantines it: one retry, which fails again and backs off for longer.
    assert service.release_quarantine(str(victim))
    run(service.settle())
    assert sent_transactions(service) == after_first + 1
    [row] = service.pending()["quarantined"]
    assert row["failures"] == 2 and row["retry_at"] > row["quarantined_at"]
    assert run(service.reconcile()).ok


def test_quarantine_is_retried_after_its_back_off(make_service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import payments.ledger.payouts as payouts

    service = make_service(section={"quarantine_backoff_s": 60})
    client = funded_client(service, 1_000_000)
    victim = Keypair().pubkey()
    plant_unpayable_ata(service, victim)
    serve_request(service, "r1", str(client.pubkey()), [(str(victim), 1)])
    run(service.settle())
    [row] = service.pending()["quarantined"]
    # The account is fixed: once the back-off has passed, the line is paid and leaves quarantine.
    service.chain.svm.set_account(get_associated_token_address(victim, service.asset.mint), Account.default())
    real_time = payouts.time.time
    monkeypatch.setattr(payouts.time, "time", lambda: real_time() + 61)
    run(service.settle())
    assert onchain_amount(service, str(victim)) == service.book.confirmed_batches()[0].items[0][1]
    assert service.pending()["quarantined"] == [] and service.book.unpaid() == {}
    assert run(service.reconcile()).ok


def test_an_underfunded_treasury_quarantines_nobody(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service(section={"asset": "sol", "default_price": {"prompt_per_1k": 10**7, "completion_per_1k": 0}})
    client = funded_client(service, 10**10)
    providers = [str(Keypair().pubkey()) for _ in range(2)]
    for i, wallet in enumerate(providers):
        serve_request(service, f"r{i}", str(client.pubkey()), [(wallet, 1)], prompt=1000, completion=0)
    svm = service.chain.svm
    account = svm.get_account(service.treasury.pubkey())
    svm.set_account(
        service.treasury.pubkey(),
        Account(100_000, bytes(account.data), account.owner, account.executable, account.rent_epoch),
    )
    run(service.settle())
    assert service.pending()["quarantined"] == [] and set(service.book.unpaid()) == set(providers)


def test_treasury_signed_transfer_is_not_a_deposit(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    run(service.faucet(str(service.treasury.pubkey()), 5_000))
    signature = run(service.submit_transaction(bytes(deposit_tx(service, service.treasury, 5_000))))
    with pytest.raises(DepositRejected, match="treasury"):
        run(service.deposit(DepositRequest(signature)))
    assert service.balance(str(service.treasury.pubkey())).available == 0
    assert run(service.reconcile()).ok


def test_sol_payout_to_the_treasury_is_not_a_deposit(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service(section={"asset": "sol"})
    signature = run(service.submit_transaction(bytes(deposit_tx(service, service.treasury, 10**6))))
    with pytest.raises(DepositRejected, match="treasury"):
        run(service.deposit(DepositRequest(signature)))


def test_relay_is_refused_on_the_rpc_backend(make_service) -> None:  # type: ignore[no-untyped-def]
    mint = str(Keypair().pubkey())
    service = make_service(
        section={"chain_backend": "rpc", "rpc_url": "http://127.0.0.1:9", "mint": mint, "open_mode": True}
    )
    app = FastAPI()
    api = LocalPaymentsClient(service)
    install_border_errors(app)
    app.include_router(build_router(lambda: api))
    payer = Keypair()
    ix = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=service.treasury.pubkey(), lamports=1))
    signed = Transaction([payer], Message.new_with_blockhash([ix], payer.pubkey(), Hash.default()), Hash.default())
    tx = base64.b64encode(bytes(signed)).decode()
    response = TestClient(app).post("/v1/deposits", json={"transaction": tx})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "relay_unsupported" and "signature" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(InvalidRequest):
        run(service.submit_transaction(b"\x01" + bytes(200)))
    run(service.close())


class LaggingNode(LiteSVMBackend):
    """A load-balanced RPC whose status lookups hit a node that lags (never saw the transaction),
    while the block height comes from a node far ahead."""

    async def signature_status(self, signature: Signature) -> SignatureStatus | None:
        return None

    async def block_height(self, commitment: str | None = None) -> int:
        return self._height + 100_000


def test_lagging_rpc_does_not_resign_a_batch_that_landed(make_service, section) -> None:  # type: ignore[no-untyped-def]
    hook, _ = crash_at("after_send")
    service = make_service(crash_hook=hook)
    client = funded_client(service, 1_000_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)])
    with pytest.raises(SimulatedCrash):
        run(service.settle())  # the batch landed; the process died before recording it
    landed = onchain_amount(service, provider)
    assert landed > 0
    lagging = make_service(chain=LaggingNode(section.state_dir / "litesvm.json"))
    before = len(lagging.chain._txs)
    run(lagging.settle())
    run(lagging.settle())
    assert onchain_amount(lagging, provider) == landed, "paid twice"
    assert len(lagging.chain._txs) == before
    [batch] = lagging.book.open_batches()
    assert batch.attempt == 1
    honest = make_service()
    run(honest.settle())
    [confirmed] = honest.book.confirmed_batches()
    assert confirmed.attempt == 1 and onchain_amount(honest, provider) == landed
    assert run(honest.reconcile()).ok


class BusyTreasury(LaggingNode):
    """The lagging node in front of a treasury with more history than the search may read."""

    async def signatures_for_address(self, address, before=None, limit=1_000):  # type: ignore[no-untyped-def]
        from payments.chain.base import SignatureInfo

        return [SignatureInfo(str(Signature.new_unique()), 1, None, None) for _ in range(limit)]


def test_an_inconclusive_history_search_waits_instead_of_resigning(make_service, section) -> None:  # type: ignore[no-untyped-def]
    hook, _ = crash_at("after_send")
    service = make_service(crash_hook=hook)
    client = funded_client(service, 1_000_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)])
    with pytest.raises(SimulatedCrash):
        run(service.settle())
    busy = make_service(chain=BusyTreasury(section.state_dir / "litesvm.json"), section={"resign_history_limit": 2_000})
    before = len(busy.chain._txs)
    run(busy.settle())
    assert len(busy.chain._txs) == before and busy.book.open_batches()[0].attempt == 1
