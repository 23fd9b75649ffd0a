"""Test helpers: a fake scorer for tests about something else, and real server processes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from models.base import EncodedItem, Scorer, TooLong

ROOT = Path(__file__).resolve().parent.parent


class FakeScorer(Scorer):
    """Deterministic stand-in (no torch): one token per character, score from a hash of the text.

    ``fail_with`` makes every ``score`` call raise that exception; ``calls`` records batch sizes.
    """

    def __init__(self, max_length: int = 4096, name: str = "fake") -> None:
        self.name = name
        self.max_length = max_length
        self.calls: list[int] = []
        self.fail_with: BaseException | None = None
        self.delay = 0.0

    def encode(self, problem: str, code: str) -> EncodedItem:
        text = f"<u>{problem}</u><a>{code}</a>"
        if len(code) + 7 > self.max_length:
            raise TooLong("code too long")
        ids = tuple(ord(c) % 1000 for c in text[: self.max_length])
        return EncodedItem(ids, len(problem) + 7, len(text) > self.max_length)

    @staticmethod
    def expected(item: EncodedItem) -> float:
        """The score the fake gives an item, whatever batch it is in."""
        digest = hashlib.sha256(repr(item.input_ids).encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 * 8 - 4

    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        self.calls.append(len(items))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        return [self.expected(item) for item in items]


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: Sequence[str], model_cache: Path, env: dict[str, str] | None = None,
                 timeout: float = 120.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``codescaler-serve`` as a real process on a free loopback port; wait for /ready.

    Output goes to a temporary file (a pipe nobody reads would fill and block the server);
    the drain phase defaults to 0 s so that stopping it in teardown is quick.
    """
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "CODESCALER_MODEL_CACHE_DIR": str(model_cache),
                "CODESCALER_DRAIN_SECONDS": "0", **(env or {})}
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), *args]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read().decode(errors='replace')}")
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready in time")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a server started by start_server and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RecordingScorer(FakeScorer):
    """FakeScorer that remembers each batch's items, to check how batches were composed."""

    def __init__(self, max_length: int = 4096) -> None:
        super().__init__(max_length)
        self.batches: list[list[EncodedItem]] = []

    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        self.batches.append(list(items))
        return super().score(items)


@contextlib.asynccontextmanager
async def app_client(app):  # type: ignore[no-untyped-def]
    """An httpx client on ``app`` in-process, with its lifespan run and the model brought up."""
    from service.app import wait_until_ready

    async with app.router.lifespan_context(app):
        await wait_until_ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
