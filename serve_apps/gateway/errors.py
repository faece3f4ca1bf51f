"""The one HTTP error border: every failure leaves as OpenAI error JSON with a 4xx/5xx status."""

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.openai_errors import BorderError, error_body, error_response, install_border_errors

logger = logging.getLogger(__name__)
__all__ = ["OpenAIError", "error_body", "error_response", "install_error_handlers", "validation_error"]


class OpenAIError(BorderError):
    """Raise anywhere in the gateway to answer with this status and OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, param=param, headers=headers)
        self.status = self.status_code = status


def install_error_handlers(app: FastAPI) -> None:
    """Map OpenAIError and PaymentError (both BorderError), validation errors, HTTP errors and anything
    unexpected to OpenAI error JSON."""
    install_border_errors(app)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(OpenAIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the gateway")
        return error_response(OpenAIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))


def validation_error(errors: Sequence[Any]) -> OpenAIError:
    """The first pydantic error as a 400 naming its field (malformed JSON included)."""
    if not errors:
        return OpenAIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(
            400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'invalid JSON')}", code="invalid_json"
        )
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")
