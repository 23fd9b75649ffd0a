"""Trainer adapters (OpenRLHF, veRL, TRL): each turns a framework's call into a client request.

The adapters only find the problem and the response in the arguments their framework
passes and ask the service through ``codescaler_client``; they never import torch at import
time and hold no model. Frameworks call plain functions, so the connection (URL and key
from ``CODESCALER_URL`` and ``CODESCALER_API_KEY``, read on first use) is shared per
process here rather than opened per call.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from codescaler_client.client import KEY_ENV, URL_ENV, AsyncCodeScalerClient, CodeScalerClient

_lock = threading.Lock()
_clients: dict[tuple[str | None, str | None], CodeScalerClient] = {}
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str | None, str | None],
                                                                          AsyncCodeScalerClient]] = (
    weakref.WeakKeyDictionary())


def _key(url: str | None, api_key: str | None) -> tuple[str | None, str | None]:
    """Connection identity after the environment fills in what the caller left out."""
    return (url or os.environ.get(URL_ENV), os.environ.get(KEY_ENV) if api_key is None else api_key)


def shared_client(url: str | None = None, api_key: str | None = None) -> CodeScalerClient:
    """One blocking client per (URL, key) per process: frameworks call from many threads."""
    key = _key(url, api_key)
    with _lock:
        if key not in _clients:
            _clients[key] = CodeScalerClient(*key)
        return _clients[key]


def shared_async_client(url: str | None = None, api_key: str | None = None) -> AsyncCodeScalerClient:
    """One asyncio client per (URL, key) per running event loop (httpx pools are loop-bound)."""
    key = _key(url, api_key)
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    if key not in per_loop:
        per_loop[key] = AsyncCodeScalerClient(*key)
    return per_loop[key]


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or a list of parts (text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, Mapping) and part.get("type", "text") == "text")
    raise ValueError(f"unsupported message content of type {type(content).__name__}")


def last_message(messages: Iterable[Any], role: str) -> str | None:
    """The text of the last message with ``role`` in a chat (list, tuple or numpy array of dicts)."""
    found = None
    for message in messages:
        if isinstance(message, Mapping) and message.get("role") == role:
            found = message_text(message.get("content", ""))
    return found
