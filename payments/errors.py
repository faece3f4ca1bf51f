"""Payments errors; each carries the HTTP status and OpenAI error type used at the HTTP border."""


class PaymentError(Exception):
    """Base of every payments error (chain transport errors are wrapped into it `from exc`)."""

    status_code = 500
    error_type = "payments_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InsufficientBalance(PaymentError):
    """The payer's balance does not cover the hold (HTTP 402)."""

    status_code = 402
    error_type = "insufficient_quota"
    code = "insufficient_balance"


class AuthenticationFailed(PaymentError):
    """Missing, forged, expired or replayed credentials (HTTP 401)."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(PaymentError):
    """Authenticated, but not allowed to read or change this object (HTTP 403)."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "forbidden"


class NotFound(PaymentError):
    """No such receipt, key or hold (HTTP 404)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class InvalidRequest(PaymentError):
    """A malformed or inconsistent request (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class DepositRejected(InvalidRequest):
    """The deposit transaction is not a final, successful transfer to the treasury."""

    code = "deposit_rejected"


class ChainError(PaymentError):
    """The chain backend failed (transport error, unexpected response)."""

    status_code = 502
    error_type = "api_error"
    code = "chain_error"
