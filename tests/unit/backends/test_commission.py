"""A proxy's commission reaches the settlement: Finished.proxy -> UsageReport -> the ledger's split."""

import asyncio

import pytest
from sqlalchemy import create_engine

from payments.errors import InvalidRequest
from payments.ledger.ledger import Ledger, SplitPolicy
from payments.pricing import Price
from payments.protocol import DepositInfo, HoldRequest, ProviderShare, SettlementRecord, UsageReport
from serve_apps.engine.messages import SamplingParams
from serve_apps.gateway.metering import Metering
from serve_apps.protocol import Finished, GenerateRequest, ProviderWork, ProxyCommission

PAYER = "payer-wallet"
PROXY = "4zvwRjXUKGfvwnParsHAS3HuSVzV5cA4McphgmoCtajS"  # the ledger pays only real (on-curve) addresses


class RecordingPayments:
    def __init__(self) -> None:
        self.reports: list[UsageReport] = []

    async def report_usage(self, report: UsageReport) -> SettlementRecord:
        self.reports.append(report)
        return SettlementRecord("set_1", report.request_id, report.payer, report.model, 0, 0, 0, 0, 0, (), 0.0)

    async def deposit_info(self) -> DepositInfo:
        return DepositInfo("treasury-wallet", None, 9, "hash", "litesvm")


def settle(finished: Finished) -> UsageReport:
    payments = RecordingPayments()
    request = GenerateRequest("r1", "px", SamplingParams(), prompt="hi")
    asyncio.run(Metering(payments).settle(request, PAYER, finished))  # type: ignore[arg-type]
    return payments.reports[0]


def test_metering_reports_the_proxy_wallet_and_rate() -> None:
    report = settle(Finished("stop", 10, 5, providers=(ProviderWork(PROXY, 1),), proxy=ProxyCommission(PROXY, 300)))
    assert (report.proxy_wallet, report.proxy_commission_bps) == (PROXY, 300)
    assert report.providers == (ProviderShare(PROXY, 1),)
    unlabelled = settle(Finished("stop", 10, 5, providers=(ProviderWork(None, 1),), proxy=ProxyCommission(None)))
    assert (unlabelled.proxy_wallet, unlabelled.proxy_commission_bps) == ("treasury-wallet", None)
    local = settle(Finished("stop", 10, 5, providers=(ProviderWork("p", 30),)))
    assert (local.proxy_wallet, local.proxy_commission_bps) == (None, None)


def ledger_with_hold() -> Ledger:
    ledger = Ledger(create_engine("sqlite://"), lambda model: Price(1_000, 1_000), SplitPolicy(500, 100))
    ledger.credit_deposit("sig", PAYER, 100_000, slot=1)
    ledger.place_hold(HoldRequest("r1", PAYER, "px", max_tokens=5_000, prompt_tokens=5_000))
    return ledger


@pytest.mark.parametrize(("bps", "proxy_share"), [(None, 100), (2_000, 2_000), (0, 0)])
def test_the_ledger_splits_by_the_proxy_rate(bps: int | None, proxy_share: int) -> None:
    report = UsageReport("r1", PAYER, "px", 5_000, 5_000, (ProviderShare(PROXY, 1),), PROXY, bps)
    (record,) = ledger_with_hold().record_usage([report])
    assert isinstance(record, SettlementRecord) and record.cost == 10_000
    shares = {line.role: line.amount for line in record.shares}
    assert shares == {"network": 500, "proxy": proxy_share, "provider": 10_000 - 500 - proxy_share}


def test_an_out_of_range_proxy_rate_is_refused() -> None:
    report = UsageReport("r1", PAYER, "px", 10, 10, (ProviderShare(PROXY, 1),), PROXY, 6_000)
    (result,) = ledger_with_hold().record_usage([report])
    assert isinstance(result, InvalidRequest) and "proxy_commission_bps" in str(result)
