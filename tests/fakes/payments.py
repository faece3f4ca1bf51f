"""PaymentsAPI over an in-process PaymentsService: what the gateway's payments routes hold in unit tests."""

from payments.forwarding import ServiceForwarder


class LocalPaymentsClient(ServiceForwarder):
    """PaymentsAPI without Ray: every call forwarded by name to `service` (sync methods called, async awaited)."""


__all__ = ["LocalPaymentsClient"]
