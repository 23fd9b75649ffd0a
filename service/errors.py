"""Typed errors and the one table that maps them to HTTP status codes.

Clients see a code and a fixed message, never exception text; a 500 carries a
request id that the server log also has.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = logging.getLogger("codescaler.errors")


class ServiceError(Exception):
    """A failure with a status code and a message that is safe to show to clients."""

    code = "internal_error"

    def __init__(self, message: str = "internal error", *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    """The request is well-formed JSON but breaks a rule (names the field)."""

    code = "invalid_request"


class PayloadTooLarge(ServiceError):
    """A size limit: body bytes, items per request or characters per field."""

    code = "payload_too_large"


class Unauthorized(ServiceError):
    """Missing or wrong API key."""

    code = "unauthorized"


class Overloaded(ServiceError):
    """The queue is full; retry after the given seconds (503 so that trainers retry)."""

    code = "overloaded"


class NotReady(ServiceError):
    """The model is loading, the batch loop is unhealthy, or the server is draining."""

    code = "not_ready"


class DeadlineExceeded(ServiceError):
    """An item waited in the queue longer than the request timeout."""

    code = "timeout"


class ScoringFailed(ServiceError):
    """The forward pass of a batch raised; the batch's requests fail, the service goes on."""

    code = "scoring_failed"


class ItemFailed(Exception):
    """One item could not be scored (reported in its result, not as an HTTP error)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: The one place where error types meet status codes.
STATUS: dict[type[ServiceError], int] = {
    InvalidRequest: 422,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    Overloaded: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
    ScoringFailed: 500,
    ServiceError: 500,
}


def status_of(error: ServiceError) -> int:
    """The status code of an error (its nearest class in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, object]:
    """The JSON shape of every error response."""
    error: dict[str, object] = {"code": code, "message": message}
    if request_id:
        error["request_id"] = request_id
    return {"error": error}


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def install_handlers(app: FastAPI) -> None:
    """Route every exception to a JSON error with the right status."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = status_of(exc)
        request_id = _request_id(request) if status >= 500 else None
        if status == 500:
            log.error("request %s failed: %s", request_id, exc.message, exc_info=exc.__cause__)
        return JSONResponse(error_body(exc.code, exc.message, request_id), status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:20]:
            where = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(error_body("invalid_request", "; ".join(problems) or "invalid request"), 422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = _request_id(request)
        log.exception("request %s failed unexpectedly", request_id, exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal error", request_id), 500)
