"""The OpenAI error format, shared by every HTTP border: one table of error types, one base error, one handler.

It lives below `serve_apps` and `payments` (imports flow one way, docs/STYLE.md's layout) so that both use it:
the gateway's handler (`serve_apps.gateway.errors.install_error_handlers`) renders `PaymentError` raised in
the payments routes the same way as its own `OpenAIError`, and a status has one error type everywhere.
"""

from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from starlette.applications import Starlette

# HTTP status -> OpenAI error `type`; any other status is an `api_error`.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


def error_type(status: int) -> str:
    """The OpenAI error type of an HTTP status."""
    return ERROR_TYPES.get(status, "api_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` for a status."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


class BorderError(Exception):
    """An error that leaves the HTTP border as OpenAI error JSON: its class (or instance) says the status and code."""

    status_code: int = 500
    code: str | None = None
    param: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if param is not None:
            self.param = param
        self.headers = headers or {}

    @property
    def error_type(self) -> str:
        return error_type(self.status_code)


def error_response(exc: BorderError) -> JSONResponse:
    """The JSON response of a border error, with its status and headers."""
    body = error_body(exc.status_code, exc.message, exc.param, exc.code)
    return JSONResponse(body, exc.status_code, headers=exc.headers)


def install_border_errors(app: "Starlette") -> None:
    """Answer every BorderError raised in a route or a dependency of `app` with its OpenAI error JSON."""

    async def _border(_: Request, exc: Exception) -> JSONResponse:
        return error_response(cast(BorderError, exc))  # registered for BorderError only

    app.add_exception_handler(BorderError, _border)
