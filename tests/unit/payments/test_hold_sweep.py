"""Orphaned holds: the sweep releases holds open longer than any request lives, and reconcile flags them."""

import time
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, update
from typer.testing import CliRunner

from cluster.config.payments import PaymentsSection
from payments.cli import app
from payments.errors import InvalidRequest
from payments.ledger.ledger import Ledger, SplitPolicy
from payments.ledger.reconcile import ledger_checks
from payments.ledger.schema import holds
from payments.pricing import Price
from payments.protocol import HoldRequest, ProviderShare, ReleaseHold, UsageReport
from payments.service import PaymentsService
from tests.unit.payments.conftest import funded_client, point_cli_at

PAYER = "payer1"


@pytest.fixture
def ledger(ledger_engine: Engine) -> Ledger:
    ledger = Ledger(ledger_engine, lambda model: Price(1_000, 2_000), SplitPolicy(500, 100))
    ledger.credit_deposit("sig1", PAYER, 10_000_000, slot=1)
    return ledger


def age(ledger: Ledger, request_id: str, seconds: float) -> None:
    """Make a hold look `seconds` old (as if it was placed that long ago)."""
    with ledger.transaction() as conn:
        conn.execute(update(holds).where(holds.c.request_id == request_id).values(created_at=time.time() - seconds))


def hold(ledger: Ledger, request_id: str) -> int:
    return ledger.place_hold(HoldRequest(request_id, PAYER, "m", 100, 10)).amount


def test_the_sweep_releases_only_holds_older_than_the_limit(ledger: Ledger) -> None:
    before = ledger.balance(PAYER, "SOL").available
    old, young = hold(ledger, "old"), hold(ledger, "young")
    age(ledger, "old", 700)
    sweep = ledger.sweep_holds(600)
    assert sweep.request_ids == ("old",) and sweep.amount == old
    balance = ledger.balance(PAYER, "SOL")
    assert (balance.available, balance.held) == (before - young, young)
    assert ledger.sweep_holds(600).request_ids == ()  # a second pass finds nothing
    checks, _ = ledger_checks(ledger, 600)
    assert all(checks.values()), checks


def test_a_settled_or_released_hold_is_never_swept(ledger: Ledger) -> None:
    hold(ledger, "settled")
    hold(ledger, "released")
    ledger.record_usage([UsageReport("settled", PAYER, "m", 5, 5, (ProviderShare("prov", 1),))])
    ledger.release_hold("released")
    for request_id in ("settled", "released"):
        age(ledger, request_id, 10_000)
    charged = 10_000_000 - ledger.balance(PAYER, "SOL").available
    assert ledger.sweep_holds(600).request_ids == ()
    assert 10_000_000 - ledger.balance(PAYER, "SOL").available == charged == 5 + 10  # 5 prompt + 5 completion


def test_a_swept_hold_cannot_be_settled_afterwards(ledger: Ledger) -> None:
    hold(ledger, "late")
    age(ledger, "late", 700)
    ledger.sweep_holds(600)
    (result,) = ledger.record_usage([UsageReport("late", PAYER, "m", 5, 5, (ProviderShare("prov", 1),))])
    assert isinstance(result, InvalidRequest)
    assert ledger.balance(PAYER, "SOL").available == 10_000_000


def test_reconcile_flags_a_hold_older_than_the_limit(ledger: Ledger) -> None:
    hold(ledger, "orphan")
    checks, figures = ledger_checks(ledger, 600)
    assert checks["no_stale_holds"]
    age(ledger, "orphan", 601)
    checks, figures = ledger_checks(ledger, 600)
    assert not checks["no_stale_holds"] and figures["oldest_open_hold_s"] >= 601
    assert ledger_checks(ledger)[0]["no_stale_holds"]  # no limit given: not checked


def test_the_service_sweeps_with_the_configured_age(make_service: Callable[..., PaymentsService]) -> None:
    service = make_service(section={"hold_max_age_s": 300})
    payer = str(funded_client(service, 5_000_000).pubkey())
    placed = service.place_hold(HoldRequest("orphan", payer, "m", 100, 10))
    assert service.sweep_holds().request_ids == ()  # younger than 300 s
    age(service.ledger, "orphan", 301)
    assert service.sweep_holds().request_ids == ("orphan",)
    assert service.balance(payer).available == 5_000_000 and placed.amount > 0
    service.release_hold(ReleaseHold("orphan"))  # the late release of its gateway is harmless


def test_the_cli_sweeps_orphans_and_reconcile_flags_them_first(
    make_service: Callable[..., PaymentsService], section: PaymentsSection, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_cli_at(section, monkeypatch)
    service = make_service()
    payer = str(funded_client(service, 5_000_000).pubkey())
    service.place_hold(HoldRequest("orphan", payer, "m", 100, 10))
    age(service.ledger, "orphan", 4_000)  # older than the default hold_max_age_s (1800 s)
    service.ledger.engine.dispose()
    runner = CliRunner()
    flagged = runner.invoke(app, ["reconcile"])
    assert flagged.exit_code == 1 and "no_stale_holds" in flagged.output
    swept = runner.invoke(app, ["sweep-holds"])
    assert swept.exit_code == 0 and "released 1 holds" in swept.output and "orphan" in swept.output, swept.output
    assert runner.invoke(app, ["reconcile"]).exit_code == 0
