"""Payments errors; each carries the HTTP status and the code used at the HTTP border.

Their OpenAI error type comes from the status, in the one table of `cluster.openai_errors` (401 is an
`authentication_error` here as in the gateway), and the gateway's error handler renders them.
"""

from cluster.openai_errors import BorderError


class PaymentError(BorderError):
    """Base of every payments error (chain transport errors are wrapped into it `from exc`)."""

    status_code = 500


class InsufficientBalance(PaymentError):
    """The payer's balance does not cover the hold (HTTP 402)."""

    status_code = 402
    code = "insufficient_balance"


class AuthenticationFailed(PaymentError):
    """Missing, forged, expired or replayed credentials (HTTP 401)."""

    status_code = 401
    code = "invalid_api_key"


class Forbidden(PaymentError):
    """Authenticated, but not allowed to read or change this object (HTTP 403)."""

    status_code = 403
    code = "forbidden"


class NotFound(PaymentError):
    """No such receipt, key or hold (HTTP 404)."""

    status_code = 404
    code = "not_found"


class InvalidRequest(PaymentError):
    """A malformed or inconsistent request (HTTP 400)."""

    status_code = 400
    code = "invalid_request"


class DepositRejected(InvalidRequest):
    """The deposit transaction is not a final, successful transfer to the treasury."""

    code = "deposit_rejected"


class ChainError(PaymentError):
    """The chain backend failed (transport error, unexpected response)."""

    status_code = 502
    code = "chain_error"
