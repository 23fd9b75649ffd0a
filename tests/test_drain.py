"""Graceful drain: a real server process under concurrent load gets SIGTERM. /ready turns
503 at once, scoring is still accepted for --drain-seconds, then refused with 503; every
accepted request is answered, none is cut off, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fake_server import start_process

pytestmark = pytest.mark.slow

CODE = "```python\ndef f(x):\n    return x + 1\n```"


@dataclass
class Outcome:
    sent: float
    done: float
    status: int | None  # None: no HTTP answer (see error)
    error: str | None
    retry_after: str | None


def client_loop(url: str, worker: int, stop: threading.Event, outcomes: list[Outcome]) -> None:
    """One trainer-like client: a keep-alive connection, one request after another.

    It stops once the server refuses (503) or cannot be reached, as a client behind a
    load balancer would move on to another replica.
    """
    body = {"items": [{"problem": f"worker {worker}", "response": CODE}] * (1 + worker % 3)}
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = client.post("/v1/score", json=body)
            except httpx.ConnectError as exc:  # never accepted: the listener is closed
                outcomes.append(Outcome(sent, time.monotonic(), None, f"connect: {exc!r}", None))
                return
            except httpx.HTTPError as exc:  # accepted (or in transit) and then cut off: a failure
                outcomes.append(Outcome(sent, time.monotonic(), None, repr(exc), None))
                return
            outcomes.append(Outcome(sent, time.monotonic(), r.status_code, None, r.headers.get("retry-after")))
            if r.status_code != 200:
                return


def drain_under_load(url: str, proc, workers: int, log: Path) -> tuple[list[Outcome], float, httpx.Response]:  # type: ignore[no-untyped-def]
    """Load the server, SIGTERM it once answers flow, and collect every request's outcome."""
    outcomes: list[Outcome] = []
    stop = threading.Event()
    threads = [threading.Thread(target=client_loop, args=(url, w, stop, outcomes)) for w in range(workers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while sum(o.status == 200 for o in outcomes) < 2 * workers:
        assert time.monotonic() < deadline, "no load established"
        time.sleep(0.01)
    killed = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    ready = httpx.get(f"{url}/ready", timeout=10)
    try:
        proc.wait(timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    return outcomes, killed, ready


def check_every_accepted_request_was_answered(outcomes: list[Outcome]) -> None:
    cut_off = [o for o in outcomes if o.status is None and not (o.error or "").startswith("connect")]
    assert cut_off == [], cut_off
    assert {o.status for o in outcomes} <= {200, 503, None}
    assert all(o.retry_after for o in outcomes if o.status == 503)


def test_sigterm_drains_the_fake_server_under_load(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, url = start_process("tests.fake_server", ["--fake-delay", "0.05", "--drain-seconds", "1.0"], log)
    outcomes, killed, ready = drain_under_load(url, proc, workers=8, log=log)
    assert ready.status_code == 503 and ready.json()["error"]["message"] == "draining"
    check_every_accepted_request_was_answered(outcomes)
    # The scenario really happened: requests in flight at SIGTERM, accepted during the
    # drain window, and refused after it.
    assert any(o.sent < killed < o.done and o.status == 200 for o in outcomes)
    assert any(o.sent > killed and o.status == 200 for o in outcomes)
    assert any(o.status == 503 for o in outcomes)
    text = log.read_text()
    assert "every admitted request was answered" in text


def test_sigterm_drains_the_real_cli_with_the_tiny_model_and_exits_0(tmp_path: Path, model_cache: Path) -> None:
    log = tmp_path / "server.log"
    proc, url = start_process("service", ["--model", "tiny-random", "--drain-seconds", "0.5"], log,
                              env={"HF_HUB_OFFLINE": "1", "CODESCALER_MODEL_CACHE_DIR": str(model_cache)})
    outcomes, killed, ready = drain_under_load(url, proc, workers=4, log=log)
    assert ready.status_code == 503
    check_every_accepted_request_was_answered(outcomes)
    assert any(o.sent > killed and o.status == 200 for o in outcomes)
