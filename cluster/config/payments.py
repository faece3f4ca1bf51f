"""Payments settings section (owned by the payments package's maintainers)."""

from pydantic import Field

from cluster.config.base import Section


class PaymentsSection(Section):
    """Ledger, pricing and Solana settlement."""

    enabled: bool = Field(default=False, description="Meter and settle requests through the payments actor.")
