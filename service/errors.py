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
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class NoProblem(ServiceError):
    """A chat input holds no user turn, so there is no problem to score its response against."""

    code = "no_problem"


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


class ClientDisconnected(ServiceError):
    """The client went away before its answer; its items were withdrawn (logged and counted only)."""

    code = "client_disconnected"


class RequestTimeout(ServiceError):
    """The request's body did not arrive within ``--body-read-timeout``; the connection is closed."""

    code = "request_timeout"


class ItemFailed(Exception):
    """One item could not be scored (reported in its result, not as an HTTP error)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: The one place where error types meet status codes.
STATUS: dict[type[ServiceError], int] = {
    InvalidRequest: 422,
    NoProblem: 400,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    Overloaded: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
    ScoringFailed: 500,
    RequestTimeout: 408,
    ClientDisconnected: 499,  # nginx's "client closed request": nobody reads it, metrics count it
    ServiceError: 500,
}

#: Errors raised by the framework itself (routing, body parsing), in the same JSON shape.
HTTP_CODES: dict[int, tuple[str, str]] = {
    400: ("bad_request", "the body could not be parsed as JSON"),
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "method not allowed on this route"),
}
#: Longest piece of a client's input (a JSON key) echoed back in an error message.
ECHO_CHARS = 64


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


def _encodable(text: str) -> str:
    """``text`` with lone surrogates escaped, so that rendering the response cannot fail."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _echo(part: object) -> str:
    """A piece of client input (a key) safe to put in a message: short and encodable."""
    text = str(part)
    return _encodable(text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "...")


def _parse_failure(exc: StarletteHTTPException) -> str:
    """Why the framework could not parse a body, from the exception type only (never its text)."""
    if isinstance(exc.__cause__, RecursionError):
        return "the JSON body is nested too deeply"
    if isinstance(exc.__cause__, UnicodeDecodeError):
        return "the body is not valid UTF-8"
    if isinstance(exc.__cause__, ValueError):  # e.g. an integer literal of thousands of digits
        return "the JSON body holds a value that cannot be parsed (a number too long?)"
    return HTTP_CODES[400][1]


def install_handlers(app: FastAPI) -> None:
    """Route every exception to a JSON error with the right status."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = status_of(exc)
        request_id = _request_id(request) if status >= 500 else None
        if status == 500:
            log.error("request %s failed: %s", request_id, exc.message, exc_info=exc.__cause__)
        elif isinstance(exc, ClientDisconnected):
            log.info("request %s: the client disconnected; its items were withdrawn", _request_id(request))
        return JSONResponse(error_body(exc.code, exc.message, request_id), status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:20]:
            # Locations can hold client-chosen keys: echo them short and encodable.
            where = ".".join(_echo(part) for part in err.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {_encodable(str(err.get('msg', 'invalid')))}")
        return JSONResponse(error_body("invalid_request", "; ".join(problems) or "invalid request"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, message = HTTP_CODES.get(exc.status_code, ("http_error", "the request cannot be served"))
        if exc.status_code == 400:
            message = _parse_failure(exc)
        return JSONResponse(error_body(code, message), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = _request_id(request)
        log.exception("request %s failed unexpectedly", request_id, exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal error", request_id), 500)
