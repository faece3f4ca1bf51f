"""A backup taken mid-run (records and a settlement being written), more activity, a restore, then
reconcile against the chain: nothing is paid twice, and the drift is exactly the payouts the chain made
for records the backup did not have. Runs on SQLite here and on PostgreSQL (pg_dump/pg_restore) in
tests/integration/ledger/test_payments_suite_on_postgres.py."""

import threading
from collections import defaultdict
from pathlib import Path

from solders.keypair import Keypair
from sqlalchemy import func, select
from typer.testing import CliRunner

from payments.cli import app
from payments.ledger.payouts import PAYEE_ROLES
from payments.ledger.schema import settlement_shares
from tests.unit.payments.conftest import funded_client, onchain_amount, point_cli_at, run, serve_request


def test_a_restored_backup_finds_later_payouts_on_chain_and_pays_nobody_twice(  # type: ignore[no-untyped-def]
    make_service, section, monkeypatch, tmp_path: Path
) -> None:
    point_cli_at(section, monkeypatch)
    cli = CliRunner()
    backup_path = tmp_path / "ledger.backup"
    earned: dict[str, int] = defaultdict(int)
    providers = [str(Keypair().pubkey()) for _ in range(4)]
    service_box: list = []

    def record(request_id: str, wallets: list[str]) -> None:
        rec = serve_request(service_box[0], request_id, payer, [(w, 10) for w in wallets])
        for share in rec.shares:
            if share.role in PAYEE_ROLES:
                earned[share.wallet] += share.amount

    def back_up_while_writing(step: str) -> None:
        if step != "after_sign" or backup_path.exists():
            return
        writer = threading.Thread(target=lambda: [record(f"bg{i}", providers[:2]) for i in range(5)])
        writer.start()  # records land while the backup copies
        done = cli.invoke(app, ["backup", str(backup_path)])
        writer.join()
        assert done.exit_code == 0 and "backed up" in done.output, done.output

    service = make_service(crash_hook=back_up_while_writing, section={"batch_max_transfers": 2})
    service_box.append(service)
    payer = str(funded_client(service, 50_000_000).pubkey())
    for i in range(8):
        record(f"r{i}", [providers[i % 4], providers[(i + 1) % 4]])
    run(service.settle())  # batch 1 is signed when the backup is taken; batch 2 is created after it
    assert backup_path.exists()
    later = str(Keypair().pubkey())
    for i in range(4):
        record(f"late{i}", [providers[0], later])  # records the backup does not have
    run(service.settle())
    assert service.book.unpaid() == {}
    batches_on_chain = len(service.book.confirmed_batches())
    for wallet, amount in earned.items():
        assert onchain_amount(service, wallet) == amount
    service.ledger.engine.dispose()

    refused = cli.invoke(app, ["backup", str(backup_path)])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert cli.invoke(app, ["restore", str(backup_path)]).exit_code == 2  # the ledger is there: refused too
    restored = cli.invoke(app, ["restore", str(backup_path), "--force"])
    assert restored.exit_code == 0 and "restored" in restored.output, restored.output

    after = make_service()
    with after.ledger.transaction() as conn:
        kept = int(
            conn.execute(
                select(func.sum(settlement_shares.c.amount)).where(settlement_shares.c.role.in_(PAYEE_ROLES))
            ).scalar()
            or 0
        )
    assert 0 < kept < sum(earned.values())  # the backup is older than the last records
    checked = cli.invoke(app, ["reconcile"])  # recover (with the chain catch-up), then every check
    assert checked.exit_code == 1 and "payouts_all_recorded" in checked.output, checked.output
    run(after.settle())
    run(after.settle())
    for wallet, amount in earned.items():
        assert onchain_amount(after, wallet) == amount, wallet  # found on chain again, not paid twice
    assert after.book.unpaid() == {} and after.book.open_batches() == []
    assert len(after.book.confirmed_batches()) == batches_on_chain
    report = run(after.reconcile())
    failed = {name for name, ok in report.checks.items() if not ok}
    assert "payouts_all_recorded" in failed and failed <= {"payouts_all_recorded", "treasury_covers_liabilities"}
    assert report.details["paid_out"] == kept
    assert report.details["unrecorded_payouts"] == sum(earned.values()) - kept  # exactly what the backup lacked
