"""The installed client (codescaler_client): retries (503 + Retry-After, 502, 504, dropped
connections), no retry on 4xx or 500, chunking that keeps input order, the API key, and
parity with the live tiny-model server.

Retry tests run against a real HTTP server on loopback (the standard library's, in a
thread) that answers from a script, records each request's arrival time, and so proves
what the client did on the wire.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from codescaler_client import AsyncCodeScalerClient, CodeScalerClient, CodeScalerError, RetryPolicy, ScoreItem

FAST = RetryPolicy(max_retries=3, backoff=0.01, max_backoff=5.0)
DROP = "drop"  # script step: close the connection without answering


def fake_results(body: dict[str, Any]) -> dict[str, Any]:
    """A /v1/score answer whose reward encodes the item, so order mistakes show."""
    results = [{"index": i, "reward": float(len(item["response"])), "score": 1.0, "valid": True,
                "extraction": {"status": "ok", "language": "python"}, "truncated": False, "tokens": 3, "error": None}
               for i, item in enumerate(body["items"])]
    return {"model": "scripted", "results": results, "usage": {"items": len(results), "scored": 0, "tokens": 0}}


@dataclass
class Scripted:
    """A loopback HTTP server answering POSTs from ``steps``, then with ``default``."""

    steps: list[Any] = field(default_factory=list)
    default: Callable[[dict[str, Any]], tuple[int, dict[str, str], dict[str, Any]]] = (
        lambda body: (200, {}, fake_results(body)))
    arrivals: list[float] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    state = Scripted()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # the standard library's method name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.arrivals.append(time.monotonic())
                state.bodies.append(body)
                state.headers.append(dict(self.headers))
                step = state.steps.pop(0) if state.steps else None
            if step == DROP:
                self.close_connection = True
                return
            status, headers, payload = step if step is not None else state.default(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def overloaded(retry_after: str | None) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return 503, headers, {"error": {"code": "overloaded", "message": "the queue is full; retry later"}}


ITEMS = [ScoreItem("p", "x" * n) for n in (1, 2, 3)]


async def score_with(url: str, items: list[ScoreItem], use_async: bool, policy: RetryPolicy = FAST) -> list[Any]:
    """``score`` through the blocking or the asyncio client."""
    if use_async:
        async with AsyncCodeScalerClient(url, retry=policy) as aclient:
            return await aclient.score(items)
    with CodeScalerClient(url, retry=policy) as client:
        return client.score(items)


def test_503_is_retried_after_the_servers_retry_after(scripted: Scripted) -> None:
    scripted.steps = [overloaded("1")]
    with CodeScalerClient(scripted.url, retry=FAST) as client:
        results = client.score(ITEMS)
    assert [r.reward for r in results] == [1.0, 2.0, 3.0]
    assert len(scripted.arrivals) == 2
    # Back-off alone would wait about 0.01 s: the gap shows Retry-After was honoured.
    assert scripted.arrivals[1] - scripted.arrivals[0] >= 1.0
    assert scripted.bodies[0] == scripted.bodies[1]


async def test_async_client_also_honours_retry_after(scripted: Scripted) -> None:
    scripted.steps = [overloaded("1")]
    async with AsyncCodeScalerClient(scripted.url, retry=FAST) as client:
        results = await client.score(ITEMS)
    assert [r.reward for r in results] == [1.0, 2.0, 3.0]
    assert len(scripted.arrivals) == 2
    assert scripted.arrivals[1] - scripted.arrivals[0] >= 1.0


@pytest.mark.parametrize("use_async", [False, True])
@pytest.mark.parametrize("status,code", [(504, "timeout"), (502, "bad_gateway")])
async def test_504_and_502_are_retried(scripted: Scripted, status: int, code: str, use_async: bool) -> None:
    scripted.steps = [(status, {}, {"error": {"code": code, "message": "try again"}})]
    results = await score_with(scripted.url, ITEMS, use_async)
    assert [r.reward for r in results] == [1.0, 2.0, 3.0]
    assert len(scripted.arrivals) == 2


@pytest.mark.parametrize("use_async", [False, True])
async def test_a_dropped_connection_is_retried(scripted: Scripted, use_async: bool) -> None:
    scripted.steps = [DROP, DROP]
    results = await score_with(scripted.url, ITEMS, use_async)
    assert [r.reward for r in results] == [1.0, 2.0, 3.0]
    assert len(scripted.arrivals) == 3


def test_a_refused_connection_is_retried_then_reported() -> None:
    from tests.helpers import free_port

    calls: list[float] = []
    policy = RetryPolicy(max_retries=2, backoff=0.01)
    with CodeScalerClient(f"http://127.0.0.1:{free_port()}", retry=policy) as client:
        original = client._http.post

        def counting_post(*args: Any, **kwargs: Any) -> httpx.Response:
            calls.append(time.monotonic())
            return original(*args, **kwargs)

        client._http.post = counting_post  # type: ignore[method-assign]
        with pytest.raises(CodeScalerError) as caught:
            client.score(ITEMS)
    assert caught.value.code == "unreachable" and caught.value.status is None
    assert len(calls) == 3


@pytest.mark.parametrize("use_async", [False, True])
@pytest.mark.parametrize("status,code", [(422, "invalid_request"), (401, "unauthorized"), (413, "payload_too_large"),
                                         (500, "internal_error")])
async def test_client_errors_and_500_are_not_retried(scripted: Scripted, status: int, code: str,
                                                     use_async: bool) -> None:
    # Retry-After on a final status must not turn it into a retry.
    scripted.steps = [(status, {"Retry-After": "0"}, {"error": {"code": code, "message": "no"}})]
    with pytest.raises(CodeScalerError) as caught:
        await score_with(scripted.url, ITEMS, use_async)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert len(scripted.arrivals) == 1


@pytest.mark.parametrize("use_async", [False, True])
async def test_retries_stop_after_max_retries(scripted: Scripted, use_async: bool) -> None:
    scripted.default = lambda body: overloaded("0")
    with pytest.raises(CodeScalerError) as caught:
        await score_with(scripted.url, ITEMS, use_async)
    assert caught.value.status == 503 and caught.value.code == "overloaded" and caught.value.retry_after == 0.0
    assert len(scripted.arrivals) == FAST.max_retries + 1


@pytest.mark.parametrize("attempt,retry_after,low,high", [
    (0, None, 0.5, 1.0),     # backoff * 2**0, jittered down to half
    (2, None, 2.0, 4.0),     # doubles per attempt
    (5, None, 5.0, 10.0),    # 32 s capped at max_backoff before the jitter
    (0, 3.0, 3.0, 3.0),      # Retry-After above the back-off wins
    (0, 60.0, 10.0, 10.0),   # ...but never beyond max_backoff
])
def test_the_wait_doubles_honours_retry_after_and_is_capped(attempt: int, retry_after: float | None,
                                                            low: float, high: float) -> None:
    policy = RetryPolicy(backoff=1.0, max_backoff=10.0)
    waits = [policy.delay(attempt, retry_after) for _ in range(50)]
    assert all(low <= w <= high for w in waits)


def test_chunks_run_concurrently_and_results_keep_input_order(scripted: Scripted) -> None:
    answered: list[int] = []  # first item's length, per chunk, in the order the server answered

    def slow_first_chunk(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        first = len(body["items"][0]["response"])
        if first == 1:
            time.sleep(1.0)  # the first chunk answers last while the others are in flight
        answered.append(first)
        return 200, {}, fake_results(body)

    scripted.default = slow_first_chunk
    items = [ScoreItem("p", "x" * n) for n in range(1, 11)]
    with CodeScalerClient(scripted.url, chunk_size=3, max_concurrency=4, retry=FAST) as client:
        results = client.score(items)
    assert sorted(len(b["items"]) for b in scripted.bodies) == [1, 3, 3, 3]
    assert answered[-1] == 1  # out-of-order answers...
    assert [r.reward for r in results] == [float(n) for n in range(1, 11)]  # ...in-order results
    assert [r.index for r in results] == list(range(10))


def test_the_api_key_and_url_come_from_the_environment(scripted: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESCALER_URL", scripted.url)
    monkeypatch.setenv("CODESCALER_API_KEY", "k-123")
    with CodeScalerClient(retry=FAST) as client:
        client.score(ITEMS[:1])
    with CodeScalerClient(api_key="explicit", retry=FAST) as client:
        client.score(ITEMS[:1])
    assert [h.get("Authorization") for h in scripted.headers] == ["Bearer k-123", "Bearer explicit"]


def test_an_empty_list_sends_nothing(scripted: Scripted) -> None:
    with CodeScalerClient(scripted.url) as client:
        assert client.score([]) == []
        assert client.get_reward([]).rewards == []
    assert scripted.bodies == []


@pytest.mark.slow
def test_chunked_scores_equal_one_request_on_the_live_server(live_server: str) -> None:
    problems = ["Write add(a, b).", "Reverse a string s."]
    responses = ["```python\ndef add(a, b):\n    return a + b\n```", "no code at all",
                 "```python\ndef rev(s):\n    return s[::-1]\n```", "```python\ndef (:\n```",
                 "```python\nprint('hi')\n```"]
    items = [{"problem": p, "response": r} for p in problems for r in responses]
    direct = httpx.post(f"{live_server}/v1/score", json={"items": items}, timeout=60).json()["results"]
    with CodeScalerClient(live_server, chunk_size=3, max_concurrency=3) as client:
        results = client.score(items)
    assert [r.reward for r in results] == pytest.approx([d["reward"] for d in direct], abs=1e-6)
    assert [r.valid for r in results] == [d["valid"] for d in direct]
    assert [r.extraction_status for r in results] == [d["extraction"]["status"] for d in direct]


@pytest.mark.slow
async def test_rank_matches_the_servers_rank(live_server: str) -> None:
    problem = "Write add(a, b)."
    responses = ["nothing", "```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a,b): return b+a\n```"]
    async with httpx.AsyncClient(base_url=live_server, timeout=60) as http:
        direct = (await http.post("/v1/rank", json={"problem": problem, "responses": responses})).json()
    async with AsyncCodeScalerClient(live_server) as client:
        ranked = await client.rank(problem, responses)
    assert (ranked.best, ranked.ranking) == (direct["best"], direct["ranking"])
    assert [r.reward for r in ranked.results] == pytest.approx([d["reward"] for d in direct["results"]], abs=1e-6)
    assert ranked.results[0].valid is False and ranked.ranking[-1] == 0
