"""The typer CLI over a local service (SOLANALM_PAYMENTS__STATE_DIR points it at the test state)."""

import csv
import json
from pathlib import Path

import pytest
from solders.keypair import Keypair
from typer.testing import CliRunner

from payments.cli import app
from tests.unit.payments.conftest import funded_client, point_cli_at, run, serve_request


@pytest.fixture
def env(section, monkeypatch) -> dict[str, str]:  # type: ignore[no-untyped-def]
    point_cli_at(section, monkeypatch)
    return {}


def test_cli_balance_settle_reconcile_export(make_service, env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    client = funded_client(service, 50_000)
    provider = str(Keypair().pubkey())
    record = serve_request(service, "r1", str(client.pubkey()), [(provider, 4)])
    service.ledger.engine.dispose()
    runner = CliRunner()
    result = runner.invoke(app, ["balance", str(client.pubkey())])
    assert result.exit_code == 0, result.output
    assert str(50_000 - record.cost) in result.output
    assert provider in runner.invoke(app, ["pending"]).output
    settled = runner.invoke(app, ["settle"])
    assert settled.exit_code == 0 and "1 payouts" in settled.output, settled.output
    assert runner.invoke(app, ["reconcile"]).exit_code == 0
    out = tmp_path / "ledger.csv"
    assert runner.invoke(app, ["export", "--out", str(out)]).exit_code == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["role"] for r in rows} == {"provider", "network"} and rows[0]["request_id"] == "r1"


def test_cli_deposit_with_keypair(make_service, env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    payer = Keypair()
    run(service.faucet(str(payer.pubkey()), 9_000))
    keyfile = tmp_path / "payer.json"
    keyfile.write_text(json.dumps(list(bytes(payer))))
    service.ledger.engine.dispose()
    result = CliRunner().invoke(app, ["deposit", "--keypair", str(keyfile), "--amount", "9000"])
    assert result.exit_code == 0 and "credited: 9000" in result.output, result.output
    assert CliRunner().invoke(app, ["deposit"]).exit_code == 2


def test_cli_pending_shows_quarantined_payees_and_unquarantine_releases_one(make_service, env) -> None:  # type: ignore[no-untyped-def]
    service = make_service()
    victim = str(Keypair().pubkey())
    service.book.quarantine(victim, "b123", "InstructionError((5, IllegalOwner))", 3_600, 86_400)
    service.ledger.engine.dispose()
    runner = CliRunner()
    shown = runner.invoke(app, ["pending"])
    assert shown.exit_code == 0 and "quarantined payees" in shown.output, shown.output
    assert victim[:10] in shown.output and "IllegalOwner" in shown.output
    assert runner.invoke(app, ["unquarantine", victim]).exit_code == 0
    assert service.book.blocked_wallets() == set()
    assert runner.invoke(app, ["unquarantine", str(Keypair().pubkey())]).exit_code == 1


def test_cli_fund_rewards_once_per_reference(make_service, env) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    first = runner.invoke(app, ["fund-rewards", "--amount", "5000", "--ref", "q4"])
    assert first.exit_code == 0 and "holds 5000" in first.output, first.output
    assert "holds 5000" in runner.invoke(app, ["fund-rewards", "--amount", "5000", "--ref", "q4"]).output
    assert "holds 5500" in runner.invoke(app, ["fund-rewards", "--amount", "500", "--ref", "q4-top-up"]).output
    assert runner.invoke(app, ["fund-rewards", "--amount", "0", "--ref", "x"]).exit_code == 2
