"""Taking a failed payout batch apart: which line the chain's error names, and what the settler does."""

import base64
from typing import Any

from solders.hash import Hash
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction

from payments.chain.failures import blame
from payments.chain.litesvm_backend import LiteSVMBackend
from payments.chain.tx import AssetSpec, BudgetSpec, PayoutLine, build_payout_tx, memo_of
from payments.ledger.payees import KNOWN_PROGRAM_IDS, payee_problem
from tests.unit.payments.conftest import funded_client, onchain_amount, run, serve_request

TREASURY = Keypair()
BUDGET = BudgetSpec(200_000, 1_000)


def payout_bytes(asset: AssetSpec, lines: list[PayoutLine]) -> bytes:
    return bytes(build_payout_tx(TREASURY, asset, lines, "b1", BUDGET, Hash.default()))


def test_the_failing_instruction_names_the_line() -> None:
    wallets = [Keypair().pubkey() for _ in range(3)]
    sol = AssetSpec(None)
    raw = payout_bytes(sol, [PayoutLine(w, 10) for w in wallets])
    items = [str(w) for w in wallets]
    # budget, budget, memo, then one transfer per line: instruction 4 is the second line
    error = "TransactionErrorInstructionError((4, Fieldless(ReadonlyLamportChange)))"
    found = blame(error, raw, items, TREASURY.pubkey(), sol)
    assert (found.kind, found.wallet) == ("line", items[1])
    mint = Keypair().pubkey()
    spl = AssetSpec(mint, 6)
    raw = payout_bytes(spl, [PayoutLine(wallets[0], 1), PayoutLine(wallets[1], 1, True), PayoutLine(wallets[2], 1)])
    for index, wallet in ((3, items[0]), (4, items[1]), (5, items[1]), (6, items[2])):  # transfer / ATA create
        error = f"TransactionErrorInstructionError(({index}, Fieldless(IllegalOwner)))"
        found = blame(error, raw, items, TREASURY.pubkey(), spl)
        assert (found.kind, found.wallet) == ("line", wallet), index


def test_treasury_side_and_unnamed_failures_blame_no_line() -> None:
    wallets = [str(Keypair().pubkey()) for _ in range(2)]
    sol = AssetSpec(None)
    raw = payout_bytes(sol, [PayoutLine(Pubkey.from_string(w), 10) for w in wallets])
    short = "TransactionErrorInstructionError((3, Tagged(InstructionErrorCustom(1))))"
    assert blame(short, raw, wallets, TREASURY.pubkey(), sol).kind == "treasury"
    assert blame("TransactionErrorInsufficientFundsForFee", raw, wallets, TREASURY.pubkey(), sol).kind == "treasury"
    rent = "TransactionErrorInsufficientFundsForRent(TransactionErrorInsufficientFundsForRent { account_index: 0 })"
    assert blame(rent, raw, wallets, TREASURY.pubkey(), sol).kind == "treasury"  # key 0 is the fee payer
    keys = list(VersionedTransaction.from_bytes(raw).message.account_keys)
    rent_of_payee = rent.replace("account_index: 0", f"account_index: {keys.index(Pubkey.from_string(wallets[1]))}")
    assert blame(rent_of_payee, raw, wallets, TREASURY.pubkey(), sol).wallet == wallets[1]
    assert blame("TransactionErrorAccountInUse", raw, wallets, TREASURY.pubkey(), sol).kind == "unknown"


def test_payee_checks() -> None:
    assert payee_problem(str(Keypair().pubkey())) is None
    for bad in ("unset", "unregistered-node-3", "", "x" * 200, str(Keypair().pubkey()) + " "):
        assert payee_problem(bad) is not None, bad
    assert all(payee_problem(p) is not None and str(Pubkey.from_string(p)) == p for p in KNOWN_PROGRAM_IDS)
    off_curve = str(Pubkey.create_with_seed(Pubkey.default(), "x", Pubkey.default()))
    assert (payee_problem(off_curve) is None) == Pubkey.from_string(off_curve).is_on_curve()
    treasury = str(TREASURY.pubkey())
    assert payee_problem(treasury, frozenset({treasury})) is not None


def test_litesvm_keeps_the_treasury_history_with_memos(make_service) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 100_000)
    serve_request(service, "r1", str(client.pubkey()), [(str(Keypair().pubkey()), 1)])
    run(service.settle())
    [batch] = service.book.confirmed_batches()
    history = run(service.chain.signatures_for_address(service.treasury.pubkey()))
    assert history[0].signature == batch.signature and history[0].memo == f"[25] solanalm:{batch.batch_id}"
    assert all(h.slot >= 0 for h in history) and len(history) >= 2  # the deposit came to the treasury too
    older = run(service.chain.signatures_for_address(service.treasury.pubkey(), before=batch.signature))
    assert [h.signature for h in older] == [h.signature for h in history[1:]]
    assert run(service.chain.signatures_for_address(Keypair().pubkey())) == []
    fetched = run(service.chain.fetch_transaction(Signature.from_string(batch.signature)))
    assert memo_of(fetched.transaction) == history[0].memo


def test_a_bad_wallet_recorded_before_the_checks_is_quarantined_not_fatal(make_service, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import payments.ledger.ledger as ledger_module

    service = make_service()
    client = funded_client(service, 100_000)
    monkeypatch.setattr(ledger_module, "payee_problem", lambda wallet, reserved=frozenset(): None)
    good = str(Keypair().pubkey())
    serve_request(service, "r1", str(client.pubkey()), [(good, 1), ("unset", 1)])  # an old ledger row
    monkeypatch.undo()
    report = run(service.settle())
    assert report.payouts_confirmed == 1 and onchain_amount(service, good) > 0
    [row] = service.pending()["quarantined"]
    assert row["wallet"] == "unset" and row["batch_id"] is None and "base58" in row["reason"]
    assert run(service.reconcile()).ok


class RefusesOnePayee(LiteSVMBackend):
    """A chain on which every transaction paying `victim` fails with an error that names no line."""

    victim: Pubkey

    def send_transaction(self, tx: VersionedTransaction) -> Any:
        if getattr(self, "victim", None) not in tx.message.account_keys:
            return super().send_transaction(tx)
        signature = tx.signatures[0]
        entry = {"tx": base64.b64encode(bytes(tx)).decode(), "err": "TransactionErrorAccountInUse", "fee": 5_000}
        self._txs.setdefault(str(signature), {**entry, "slot": 1})
        return signature


def test_a_failure_naming_no_line_retries_the_lines_singly(make_service, section) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 100_000)
    goods = [str(Keypair().pubkey()) for _ in range(3)]
    victim = Keypair().pubkey()
    for i, wallet in enumerate([*goods, str(victim)]):
        serve_request(service, f"r{i}", str(client.pubkey()), [(wallet, 1)])
    run(service.chain.close())
    chain = RefusesOnePayee(section.state_dir / "litesvm.json")
    chain.victim = victim
    service = make_service(chain=chain)
    before = len(chain._txs)
    report = run(service.settle())
    assert report.payouts_confirmed == 3 and all(onchain_amount(service, w) > 0 for w in goods)
    sizes = [len(b.items) for b in service.book.confirmed_batches()]
    assert sizes == [1, 1, 1] and len(chain._txs) - before == 5  # 1 failed batch of 4, then 4 singles
    assert [q["wallet"] for q in service.pending()["quarantined"]] == [str(victim)]
    run(service.settle())
    assert len(chain._txs) - before == 5
    assert run(service.reconcile()).ok
