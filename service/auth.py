"""Bearer-key authentication: who may score, and who may read /metrics.

Keys come from ``--api-key`` (repeatable) and ``--api-key-file`` and are read once,
when the app is built. No keys configured means the service is open (the CLI warns
when it binds beyond loopback that way). The supplied key is compared with every
accepted key in constant time; comparing SHA-256 digests also hides the key length.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized
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


def _accepted(digests: tuple[bytes, ...], supplied: str) -> bool:
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
    if not digests:
        return
    if credentials is not None and _accepted(digests, credentials.credentials):
        return
    client = request.client.host if request.client else "?"
    log.warning("request %s to %r from %s: %s API key", getattr(request.state, "request_id", "?"),
                request.url.path, client, "wrong" if credentials is not None else "no")
    raise Unauthorized("a valid API key is required (Authorization: Bearer <key>)",
                       headers={"WWW-Authenticate": "Bearer"})


async def require_metrics_key(request: Request, credentials: Credentials) -> None:
    """/metrics needs a key like the scoring routes, unless ``--metrics-public``."""
    if not request.app.state.settings.metrics_public:
        await require_key(request, credentials)
