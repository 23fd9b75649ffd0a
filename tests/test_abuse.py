"""Abuse over loopback (a real uvicorn, FaultScorer): the key before the body, a trickled body,
the bound on active requests, and a flood refused before any work while admitted work completes."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.fake_server import serve_in_thread
from tests.fault_scorers import FaultScorer

pytestmark = pytest.mark.slow

CODE = "```python\ndef f(x):\n    return x + 1\n```"
KEY = "s3cret-key"
#: Long enough for any answer the server gives at once; a server that waited for the body
#: (its read timeout is 600 s here) would leave the socket silent past it and fail the test.
PATIENCE_S = 30


def app_for(fault_scorer: FaultScorer, **overrides: object):  # type: ignore[no-untyped-def]
    settings = {"model": "fake", "api_key": [KEY], "body_read_timeout": 600.0, **overrides}
    return create_app(Settings(**settings), fault_scorer)  # type: ignore[arg-type]


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=PATIENCE_S)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """Status and raw head+body of the first response; reads until the server closes."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data


def headers(path: str, extra: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("auth", ["Authorization: Bearer wrong\r\n", ""], ids=["wrong-key", "no-key"])
@pytest.mark.parametrize("framing", ["sized", "chunked"])
def test_no_valid_key_gets_401_from_the_headers_before_the_body(fault_scorer: FaultScorer, auth: str,
                                                                 framing: str) -> None:
    with serve_in_thread(app_for(fault_scorer)) as url, connect(url) as sock:
        if framing == "sized":
            sock.sendall(headers("/v1/score", f"{auth}Content-Length: 30000000\r\n") + b"{" + b" " * 1023)
        else:
            sock.sendall(headers("/v1/score", f"{auth}Transfer-Encoding: chunked\r\n") + b"400\r\n" + b" " * 1024
                         + b"\r\n")
        status, answer = read_answer(sock)  # the rest of the 30 MB never comes
    assert status == 401
    assert b"www-authenticate: Bearer" in answer.lower().replace(b"bearer", b"Bearer")
    assert b"connection: close" in answer.lower()
    assert fault_scorer.encoded == 0


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_is_freed(fault_scorer: FaultScorer) -> None:
    with serve_in_thread(app_for(fault_scorer, body_read_timeout=0.5)) as url, connect(url) as sock:
        sock.sendall(headers("/v1/score", f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n") + b'{"items"')
        status, answer = read_answer(sock)  # returns only because the server closed the connection
    assert status == 408 and b"request_timeout" in answer


def test_behind_a_proxy_a_lost_body_is_a_retryable_503(fault_scorer: FaultScorer) -> None:
    """A Ray Serve replica: the proxy read the body already; one that never arrives was lost on its way."""
    settings = Settings(model="fake", api_key=[KEY], body_read_timeout=0.5)  # type: ignore[call-arg]
    app = create_app(settings, fault_scorer, behind_proxy=True)  # type: ignore[arg-type]
    with serve_in_thread(app) as url, connect(url) as sock:
        sock.sendall(headers("/v1/score", f"Authorization: Bearer {KEY}\r\nContent-Length: 1000\r\n") + b'{"items"')
        status, answer = read_answer(sock)
    assert status == 503 and b"retry-after: 1" in answer.lower() and fault_scorer.encoded == 0


def test_the_active_request_bound_ignores_idle_keepalive_connections(fault_scorer: FaultScorer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"items": [{"problem": "p", "response": CODE}]}
    slow_head = headers("/v1/score", f"Authorization: Bearer {KEY}\r\nContent-Length: 500\r\n")
    with serve_in_thread(app_for(fault_scorer, max_active_requests=2)) as url:
        idle = [connect(url) for _ in range(8)]  # connected, no request: a pool's idle connections
        with httpx.Client(base_url=url, timeout=PATIENCE_S) as pool:
            assert pool.post("/v1/score", json=body, headers=auth).status_code == 200  # now idle keep-alive
            assert pool.post("/v1/score", json=body, headers=auth).status_code == 200
            slow: list[socket.socket] = []  # two requests whose bodies are still arriving
            for _ in range(100):
                # A slow request that lost the race for a slot to the previous probe was answered
                # 503 at once: replace it. A probe refused proves both slow requests hold a slot
                # (only they and the probe can be in progress).
                slow = [sock for sock in slow if not select.select([sock], [], [], 0)[0]]
                while len(slow) < 2:
                    slow.append(connect(url))
                    slow[-1].sendall(slow_head)
                refused = pool.post("/v1/score", json=body, headers=auth)
                if refused.status_code == 503:
                    break
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"
            assert pool.get("/health").status_code == 200 and pool.get("/ready").status_code == 200
            for sock in slow:
                sock.close()
            after = _until(lambda: pool.post("/v1/score", json=body, headers=auth), lambda r: r.status_code == 200)
        for sock in idle:
            sock.close()
    assert after.json()["results"][0]["valid"]


def _until(call, done, attempts: int = 500):  # type: ignore[no-untyped-def]
    """Call until ``done(result)``; the server notices closed sockets asynchronously."""
    for _ in range(attempts):
        result = call()
        if done(result):
            return result
        time.sleep(0.02)
    raise AssertionError(f"never reached; last answer {result.status_code}")


def test_a_flood_gets_503_before_any_work_while_admitted_work_completes(fault_scorer: FaultScorer) -> None:
    """Ten times the queue capacity at once: the admitted requests (and the one seated) are
    answered 200 once the model runs; all others get 503 + Retry-After while the model is still
    held, so without waiting for any work, and none of them was ever tokenized."""
    capacity, flood = 8, 80
    app = app_for(fault_scorer, api_key=[], max_queue_items=capacity, max_items_per_request=1, max_batch_items=4)

    async def fire(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=PATIENCE_S,
                                     limits=httpx.Limits(max_connections=flood)) as client:
            tasks = [asyncio.create_task(client.post("/v1/score", json={
                "items": [{"problem": f"flood {i}", "response": CODE}]})) for i in range(flood)]
            refused: list[httpx.Response] = []
            while len(refused) < flood - capacity - 1:  # all but the admitted ones and the seated one
                done, _ = await asyncio.wait([t for t in tasks if not t.done() or t.result() not in refused],
                                             timeout=PATIENCE_S, return_when=asyncio.FIRST_COMPLETED)
                assert done, "the flood was not answered while the model was held"
                refused.extend(t.result() for t in done if t.result() not in refused)
            assert fault_scorer.gate.is_set() is False  # the model is still held: these came without work
            assert all(r.status_code == 503 and r.headers["retry-after"] for r in refused)
            assert fault_scorer.encoded <= capacity  # the refused ones cost no tokenization
            fault_scorer.gate.set()
            return list(await asyncio.gather(*tasks))

    fault_scorer.gate.clear()
    with serve_in_thread(app) as url:
        answers = asyncio.run(fire(url))
        metrics = httpx.get(f"{url}/metrics").text
    statuses = [r.status_code for r in answers]
    assert statuses.count(200) == capacity + 1 and statuses.count(503) == flood - capacity - 1
    assert fault_scorer.encoded == capacity + 1
    assert f'codescaler_refused_total{{reason="overloaded"}} {flood - capacity - 1}.0' in metrics
