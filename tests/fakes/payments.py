"""PaymentsAPI over an in-process PaymentsService: what the gateway's payments routes hold in unit tests."""

from payments.forwarding import AsyncCall, service_call
from payments.protocol import PAYMENTS_METHODS
from payments.service import PaymentsService


class LocalPaymentsClient:
    """PaymentsAPI without Ray: every call forwarded by name to `service` (sync methods called, async awaited)."""

    def __init__(self, service: PaymentsService) -> None:
        self.service = service

    def __getattr__(self, name: str) -> AsyncCall:
        if name not in PAYMENTS_METHODS:
            raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")
        return service_call(self.service, name)


__all__ = ["LocalPaymentsClient"]
