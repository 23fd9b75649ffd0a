"""Pure ASGI middleware: request ids, request metrics, the active-request bound, the body limits.

Pure ASGI rather than BaseHTTPMiddleware so that chunked bodies are counted as they
stream in and no extra task sits between the client and the route. Order, outermost
first: ObserveMiddleware, the key check (service/auth.py), ActiveLimitMiddleware,
BodyLimitMiddleware; so a request without a key, or one over the bound, is answered
from its headers before any of its body is read.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import (
    ClientDisconnected,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    error_body,
    status_of,
)
from service.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ObserveMiddleware:
    """Gives each request an id (``x-request-id``) and counts it by endpoint and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"  # bounded label values
        headers = dict(scope.get("headers") or [])
        supplied = headers.get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = supplied if supplied.isprintable() and supplied else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)


class ActiveLimitMiddleware:
    """503 + Retry-After, from the headers alone, once ``limit`` requests are being read or answered.

    A request counts from its headers to its last response byte. uvicorn calls the app
    only when a request's headers have arrived, so idle keep-alive connections (a
    trainer's connection pool) never count: the bound is on work, not on connections.
    /health and /ready are never refused, so probes see the truth under a flood.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[str]) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await send_error(send, Overloaded("too many requests in progress; retry later",
                                              headers={"Retry-After": "1"}))
            return
        self.active += 1
        counted = True

        def release() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.active -= 1

        async def send_and_release(message: Message) -> None:
            # Released before the last byte goes out: once a client has its answer, its
            # request no longer counts (its next request on the connection must not race it).
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes (by Content-Length at once, or while a chunked body
    streams); 408 for a body that has not fully arrived ``read_timeout`` seconds after it began.

    The body is read here, whole, before the app sees the request: the framework turns
    any error raised while it reads a body into a 400, so the limits must be enforced
    (and their answers sent) before the framework starts reading. The framework buffers
    the whole body anyway, so this costs no extra memory beyond one join. Both answers
    close the connection, which frees it from a client that trickles its body.
    """

    def __init__(self, app: ASGIApp, limit: int, read_timeout: float = 60.0, behind_proxy: bool = False) -> None:
        """``behind_proxy``: a proxy that has read the body already delivers it (Ray Serve); one that
        does not arrive is then lost between proxy and replica, not withheld by the client, so the
        answer is a retryable 503 instead of 408."""
        self.app = app
        self.limit = limit
        self.read_timeout = read_timeout
        self.behind_proxy = behind_proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"the body exceeds {self.limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await send_error(send, too_large)
            return
        chunks: list[bytes] = []
        seen = 0
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, give_up - loop.time()))
            except TimeoutError:
                late = (Overloaded("the body did not reach this replica; retry", headers={"Retry-After": "1"})
                        if self.behind_proxy else
                        RequestTimeout(f"the body did not arrive within {self.read_timeout:g} s"))
                await send_error(send, late)
                return
            if message["type"] != "http.request":  # gone before the body was complete
                await send_error(send, ClientDisconnected("the client disconnected"))
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await send_error(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            """The buffered body once; then the real channel (where a disconnect shows up)."""
            nonlocal body
            if body is not None:
                message: Message = {"type": "http.request", "body": body, "more_body": False}
                body = None
                return message
            return await receive()

        await self.app(scope, replay, send)


async def send_error(send: Send, error: ServiceError) -> None:
    """Answer from a middleware itself; ``connection: close`` because unread body bytes may follow."""
    body = json.dumps(error_body(error.code, error.message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": status_of(error), "headers": headers})
    await send({"type": "http.response.body", "body": body})
