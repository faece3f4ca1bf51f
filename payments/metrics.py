"""Payments metrics: settlement batches pending/confirmed, payouts, amounts paid and still owed.

Recorded after every settle pass (the payments actor's loop, `solanalm payments settle`, crash
recovery). Amounts are base units of the settlement asset: lamports for SOL, the mint's smallest unit
for an SPL token. Exported by Ray's Prometheus endpoint as `ray_<name>` (cluster/observability/metrics.py).
"""

from cluster.observability.metrics import MetricSet, MetricSpec
from payments.protocol import BatchReport

BATCHES_PENDING = "solanalm_settlement_batches_pending"
BATCHES_CONFIRMED = "solanalm_settlement_batches_confirmed"
PAYOUTS_CONFIRMED = "solanalm_payouts_confirmed"
LAMPORTS_PAID = "solanalm_lamports_paid"
UNPAID = "solanalm_unpaid_lamports"

SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(BATCHES_PENDING, "gauge", "Payout batches created, signed or sent but not yet confirmed on chain."),
    MetricSpec(BATCHES_CONFIRMED, "counter", "Payout batches confirmed on chain."),
    MetricSpec(PAYOUTS_CONFIRMED, "counter", "Payout lines (one provider wallet each) confirmed on chain."),
    MetricSpec(LAMPORTS_PAID, "counter", "Base units (lamports for SOL) paid to providers on chain."),
    MetricSpec(UNPAID, "gauge", "Base units earned by providers and recorded in the ledger, not yet paid."),
)

METRICS = MetricSet(SPECS)


def record_settle_pass(report: BatchReport, unpaid_base_units: int | None = None) -> None:
    """One settle (or recovery) pass: what it confirmed and paid, what is still pending and owed."""
    METRICS.set(BATCHES_PENDING, report.pending_batches)
    METRICS.inc(BATCHES_CONFIRMED, report.batches_confirmed)
    METRICS.inc(PAYOUTS_CONFIRMED, report.payouts_confirmed)
    METRICS.inc(LAMPORTS_PAID, report.amount_paid)
    if unpaid_base_units is not None:
        METRICS.set(UNPAID, unpaid_base_units)
