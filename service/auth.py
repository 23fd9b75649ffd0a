"""Bearer-key authentication: who may score, and who may read /metrics.

Keys come from ``--api-key`` (repeatable) and ``--api-key-file`` and are read once,
when the app is built. No keys configured means the service is open (the CLI warns
when it binds beyond loopback that way). The supplied key is compared with every
accepted key in constant time; comparing SHA-256 digests also hides the key length.

The decision is made by ``KeyCheck``, a pure ASGI middleware, from the headers alone:
a request without a valid key gets its 401 before one byte of its body is read, for
sized and chunked bodies alike, and its connection is closed. The route dependencies
below stay, for the OpenAPI document and for apps mounted without the middleware.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import MutableMapping
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized
from service.middleware import ASGIApp, Receive, Send, send_error
from service.settings import Settings

log = logging.getLogger("codescaler.auth")

#: Documents the scheme in /openapi.json; parsing only, the decision is ours (so no auto 403).
bearer = HTTPBearer(auto_error=False, description="One of the keys given by --api-key / --api-key-file.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def load_keys(settings: Settings) -> tuple[str, ...]:
    """Every accepted key; ValueError for an empty key, OSError for an unreadable key file.

    An empty key, or a key file without keys, would silently leave the service open
    where its operator meant to close it: refuse both at start.
    """
    if any(not key.strip() for key in settings.api_key):
        raise ValueError("--api-key was given an empty key")
    keys = settings.api_keys()
    if settings.api_key_file is not None and len(keys) == len(settings.api_key):
        raise ValueError(f"the key file {settings.api_key_file} holds no key")
    return tuple(key.strip() for key in keys)


def key_digests(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    """What app.state keeps: digests, so that no comparison depends on a key's length."""
    return tuple(hashlib.sha256(key.encode("utf-8")).digest() for key in keys)


def accepted(digests: tuple[bytes, ...], supplied: str) -> bool:
    """Compare against every key without stopping at the first match (no timing hint which one)."""
    # Starlette decodes header bytes as latin-1; encoding back gives the bytes the client sent.
    given = hashlib.sha256(supplied.encode("latin-1", "replace")).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(given, digest)
    return matched


async def require_key(request: Request, credentials: Credentials) -> None:
    """401 + ``WWW-Authenticate: Bearer`` unless the request carries an accepted key (or none are set)."""
    digests: tuple[bytes, ...] = request.app.state.key_digests
    if not digests or getattr(request.state, "key_checked", False):  # KeyCheck has decided already
        return
    if credentials is not None and accepted(digests, credentials.credentials):
        return
    client = request.client.host if request.client else "?"
    log.warning("request %s to %r from %s: %s API key", getattr(request.state, "request_id", "?"),
                request.url.path, client, "wrong" if credentials is not None else "no")
    raise _unauthorized()


def _unauthorized() -> Unauthorized:
    return Unauthorized("a valid API key is required (Authorization: Bearer <key>)",
                        headers={"WWW-Authenticate": "Bearer"})


def bearer_key(authorization: bytes | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, key = authorization.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


class KeyCheck:
    """Pure ASGI: 401 from the headers alone on ``protected`` paths, before any body is read.

    CORS preflights (OPTIONS) pass: browsers send them without credentials.
    """

    def __init__(self, app: ASGIApp, digests: tuple[bytes, ...], protected: frozenset[str]) -> None:
        self.app = app
        self.digests = digests
        self.protected = protected

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.digests or scope.get("method") == "OPTIONS"
                or scope.get("path") not in self.protected):
            await self.app(scope, receive, send)
            return
        key = bearer_key(dict(scope.get("headers") or []).get(b"authorization"))
        if key is not None and accepted(self.digests, key):
            scope.setdefault("state", {})["key_checked"] = True
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?",)
        log.warning("request %s to %r from %s: %s API key", scope.get("state", {}).get("request_id", "?"),
                    scope.get("path"), client[0], "wrong" if key is not None else "no")
        await send_error(send, _unauthorized())


async def require_metrics_key(request: Request, credentials: Credentials) -> None:
    """/metrics needs a key like the scoring routes, unless ``--metrics-public``."""
    if not request.app.state.settings.metrics_public:
        await require_key(request, credentials)
