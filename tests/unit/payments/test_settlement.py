"""End to end on LiteSVM: deposit -> requests -> batched payouts -> chain equals ledger."""

from collections import defaultdict

from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from spl.memo.constants import MEMO_PROGRAM_ID

from payments.chain.litesvm_backend import LiteSVMBackend
from payments.protocol import ReceiptQuery
from tests.unit.payments.conftest import funded_client, onchain_amount, run, serve_request


def paid_by_ledger(service) -> dict[str, int]:  # type: ignore[no-untyped-def]
    totals: dict[str, int] = defaultdict(int)
    for batch in service.book.confirmed_batches():
        for wallet, amount in batch.items:
            totals[wallet] += amount
    return dict(totals)


def test_spl_end_to_end_chain_balances_equal_the_ledger(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    clients = [funded_client(service, 2_000_000) for _ in range(2)]
    providers = [str(Keypair().pubkey()) for _ in range(24)]
    proxy = str(Keypair().pubkey())
    records = []
    for i in range(30):
        payer = str(clients[i % 2].pubkey())
        hops = [(providers[i % 24], 16), (providers[(i + 5) % 24], 14)]
        records.append(serve_request(service, f"req-{i}", payer, hops, proxy=proxy if i % 3 == 0 else None))
    report = run(service.settle())
    assert report.pending_batches == 0 and report.payouts_confirmed == 25
    earned: dict[str, int] = defaultdict(int)
    for record in records:
        for share in record.shares:
            if share.role != "network":
                earned[share.wallet] += share.amount
    assert paid_by_ledger(service) == dict(earned)
    for wallet, amount in earned.items():
        assert onchain_amount(service, wallet) == amount, wallet
    for client in clients:
        spent = sum(r.cost for r in records if r.payer == str(client.pubkey()))
        assert service.balance(str(client.pubkey())).available == 2_000_000 - spent
    reconcile = run(service.reconcile())
    assert reconcile.ok, reconcile.checks
    receipt = service.get_receipt(ReceiptQuery(records[0].settlement_id, records[0].payer))
    assert receipt.settled and len(receipt.signatures) >= 1


def test_batches_carry_memo_and_compute_budget(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 1_000_000)
    serve_request(service, "r1", str(client.pubkey()), [(str(Keypair().pubkey()), 1)])
    run(service.settle())
    [batch] = service.book.confirmed_batches()
    fetched = run(service.chain.fetch_transaction(Signature.from_string(batch.signature)))
    keys = fetched.transaction.message.account_keys
    programs = [str(keys[ix.program_id_index]) for ix in fetched.transaction.message.instructions]
    assert programs[0] == programs[1] == "ComputeBudget111111111111111111111111111111"
    memo_ix = fetched.transaction.message.instructions[2]
    assert keys[memo_ix.program_id_index] == MEMO_PROGRAM_ID
    assert bytes(memo_ix.data) == f"solanalm:{batch.batch_id}".encode()


def test_sol_payouts_pack_19_per_legacy_transaction_and_hold_sub_rent_amounts(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service(
        section={
            "asset": "sol",
            "default_price": {"prompt_per_1k": 10**7, "completion_per_1k": 10**7},
        }
    )
    client = funded_client(service, 10**11)
    rich = [str(Keypair().pubkey()) for _ in range(40)]
    for i, wallet in enumerate(rich):
        serve_request(service, f"r{i}", str(client.pubkey()), [(wallet, 1)], prompt=100, completion=0)
    tiny = str(Keypair().pubkey())  # 1 token: 10,000 lamports, below rent exemption of a new account
    serve_request(service, "tiny", str(client.pubkey()), [(tiny, 1)], prompt=1, completion=0)
    report = run(service.settle())
    assert report.payouts_confirmed == 40 and report.held_wallets == 1
    sizes = sorted(len(b.items) for b in service.book.confirmed_batches())
    assert sizes == [2, 19, 19]
    for wallet in rich:
        assert onchain_amount(service, wallet) == paid_by_ledger(service)[wallet] > 0
    assert onchain_amount(service, tiny) == 0 and service.book.unpaid()[tiny] > 0
    assert run(service.reconcile()).ok


def test_expired_blockhash_is_resigned_and_paid_once(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 1_000_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)])
    batch = service.book.create_batch([provider])
    run(service.settler._sign(batch))  # signed and stored, never sent
    first_signature = service.book.get(batch.batch_id).signature
    assert isinstance(service.chain, LiteSVMBackend)
    service.chain.expire_blockhash()
    run(service.settle())
    final = service.book.get(batch.batch_id)
    assert final.state == "confirmed" and final.signature != first_signature
    assert run(service.chain.signature_status(Signature.from_string(first_signature))) is None
    assert onchain_amount(service, provider) == final.items[0][1]


def test_failed_batch_is_not_paid_and_returns_to_unpaid(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service(section={"asset": "sol", "default_price": {"prompt_per_1k": 10**7, "completion_per_1k": 0}})
    client = funded_client(service, 10**10)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)], prompt=1000, completion=0)
    # Drain the treasury on chain so the payout transfer fails (fees still paid).
    svm = service.chain.svm
    account = svm.get_account(service.treasury.pubkey())
    from solders.account import Account

    svm.set_account(
        service.treasury.pubkey(),
        Account(100_000, bytes(account.data), account.owner, account.executable, account.rent_epoch),
    )
    run(service.settle())
    assert onchain_amount(service, provider) == 0
    assert service.book.unpaid()[provider] > 0
    checks = run(service.reconcile()).checks
    assert checks["balances_match_postings"] and checks["payee_balances_match_unpaid_shares"]
    assert not checks["treasury_covers_liabilities"]


def test_restart_keeps_chain_balances(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 1_000_000)
    provider = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(provider, 1)])
    run(service.settle())
    paid = onchain_amount(service, provider)
    restarted = make_service()
    assert restarted.asset == service.asset and restarted.treasury.pubkey() == service.treasury.pubkey()
    assert onchain_amount(restarted, provider) == paid > 0
    assert run(restarted.reconcile()).ok
    assert Pubkey.from_string(provider) != restarted.treasury.pubkey()


def test_training_rewards_are_paid_once_with_the_next_batch(make_service) -> None:  # type: ignore[no-untyped-def]
    from payments.protocol import TrainingReward

    service = make_service()
    client = funded_client(service, 1_000_000)  # the treasury holds client funds to pay from
    trainer = str(Keypair().pubkey())
    reward = TrainingReward("fl-demo", 1, trainer, amount=7_000, examples=70)
    service.fund_training_rewards("ops-1", 7_000)  # the network's money, set aside for rewards
    [record] = service.record_training_rewards([reward])
    [again] = service.record_training_rewards([reward])
    assert again.settlement_id == record.settlement_id
    assert service.balance(trainer).unpaid_earnings == 7_000
    run(service.settle())
    assert onchain_amount(service, trainer) == 7_000
    receipt = service.get_receipt(ReceiptQuery(record.settlement_id, trainer))
    assert receipt.settled
    # Rewards are the network's money: paid from client funds, the treasury no longer covers them.
    assert not run(service.reconcile()).checks["treasury_covers_liabilities"]
    run(service.faucet(str(service.treasury.pubkey()), 7_000))  # the operator sends the funding on chain
    report = run(service.reconcile())
    assert report.ok and report.details["rewards"] == 7_000
    assert service.balance(str(client.pubkey())).available == 1_000_000
