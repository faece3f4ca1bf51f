"""Withholding a provider's payout for one request (a failed audit), before it is batched.

The share stays in `settlement_shares` (so the record still adds up to the request's cost) with role
`withheld`, which no payout batch takes; its amount moves from the provider's unpaid earnings
(`payee:<wallet>`) to the `withheld` account, kept by the network. A share already in a payout batch
is on its way to the chain and cannot be withheld: it is reported as `too_late`.
"""

from sqlalchemy import select, update

from payments.errors import NotFound
from payments.ledger import accounts as acct
from payments.ledger.accounts import Posting
from payments.ledger.ledger import Ledger
from payments.ledger.schema import settlement_shares, settlements
from payments.protocol import WithheldPayout, WithholdPayout

WITHHELD = "withheld"  # account of withheld provider earnings (the network's, until adjudicated)
WITHHELD_ROLE = "withheld"


def withhold_payout(ledger: Ledger, req: WithholdPayout) -> WithheldPayout:
    """Withhold the unpaid provider shares of `req.wallets` in the request's settlement (idempotent)."""
    with ledger.transaction() as conn:
        settlement_id = conn.execute(
            select(settlements.c.id).where(settlements.c.request_id == req.request_id)
        ).scalar()
        if settlement_id is None:
            raise NotFound(f"no settlement for request {req.request_id}")
        shares = conn.execute(
            select(settlement_shares).where(
                settlement_shares.c.settlement_id == settlement_id,
                settlement_shares.c.role == "provider",
                settlement_shares.c.wallet.in_(req.wallets),
            )
        ).all()
        unpaid = [s for s in shares if s.batch_id is None]
        ledger.post(
            conn,
            [
                Posting(f"withhold:{settlement_id}", "withhold", acct.payee(s.wallet), WITHHELD, s.amount)
                for s in unpaid
            ],
        )
        if unpaid:
            conn.execute(
                update(settlement_shares)
                .where(settlement_shares.c.id.in_([s.id for s in unpaid]))
                .values(role=WITHHELD_ROLE)
            )
    return WithheldPayout(
        request_id=req.request_id,
        settlement_id=str(settlement_id),
        amount=sum(int(s.amount) for s in unpaid),
        wallets=tuple(sorted({s.wallet for s in unpaid})),
        too_late=tuple(sorted({s.wallet for s in shares if s.batch_id is not None})),
    )
