"""Fault injection: a forward that raises, returns NaN, runs out of memory, is slow or hangs;
requests that wait too long; clients that disconnect. Every accepted request gets one answer."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.fake_server import serve_in_thread
from tests.fault_scorers import INF, NAN, OOM, RAISE, FaultScorer
from tests.helpers import app_client

CODE = "```python\ndef f(x):\n    return x + 1\n```"


@pytest.fixture
def scorer(fault_scorer: FaultScorer) -> FaultScorer:
    """The shared gated FaultScorer (tests/conftest.py)."""
    return fault_scorer


def item(problem: str) -> dict[str, str]:
    return {"problem": problem, "response": CODE}


def app_for(scorer: FaultScorer, **overrides: object):  # type: ignore[no-untyped-def]
    return create_app(Settings(model="fake", **overrides), scorer)  # type: ignore[arg-type]


async def wait_for(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition`` (an async callable) until true; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


async def test_an_exception_in_a_forward_is_a_500_with_a_request_id_and_the_service_goes_on(
    scorer: FaultScorer, caplog: pytest.LogCaptureFixture
) -> None:
    scorer.fail_with = RuntimeError("CUDA error: device-side assert /secret/path")
    async with app_client(app_for(scorer)) as client:
        with caplog.at_level(logging.ERROR):
            failed = await client.post("/v1/score", json={"items": [item("a"), item("b")]})
        scorer.fail_with = None
        after = await client.post("/v1/score", json={"items": [item("c")]})
        ready = await client.get("/ready")
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == "scoring_failed" and error["request_id"] == failed.headers["x-request-id"]
    assert "secret" not in failed.text and "CUDA" not in failed.text
    assert error["request_id"] in caplog.text and "secret" in caplog.text  # the log has what clients do not
    assert after.status_code == 200 and after.json()["results"][0]["valid"]
    assert ready.status_code == 200


async def test_a_failing_batch_fails_only_its_own_requests(scorer: FaultScorer) -> None:
    scorer.gate.clear()
    async with app_client(app_for(scorer, max_batch_items=1)) as client:
        first = asyncio.create_task(client.post("/v1/score", json={"items": [item(RAISE)]}))
        await asyncio.to_thread(scorer.in_forward.wait)
        second = asyncio.create_task(client.post("/v1/score", json={"items": [item("second")]}))
        await wait_for(lambda: _queued(client, 1), "the second request is queued")
        scorer.gate.set()
        r1, r2 = await first, await second
    assert scorer.batches == [[RAISE], ["second"]]
    assert (r1.status_code, r2.status_code) == (500, 200)


async def _queued(client: httpx.AsyncClient, n: int) -> bool:
    r = await client.get("/ready")
    return r.status_code == 200 and r.json()["queue_items"] == n


async def test_non_finite_scores_are_per_item_errors_in_a_200(scorer: FaultScorer) -> None:
    async with app_client(app_for(scorer)) as client:
        r = await client.post("/v1/score", json={"items": [item("fine"), item(NAN), item(INF), item("also fine")]})
        ranked = await client.post("/v1/rank", json={"problem": NAN, "responses": [CODE, CODE]})
        reward = await client.post("/get_reward", json={"query": ["<|im_start|>user\nNAN<|im_end|>\n"
                                                                  "<|im_start|>assistant\n" + CODE]})
    assert len(scorer.batches) == 3 and sorted(scorer.batches[0]) == sorted(["fine", NAN, INF, "also fine"])
    assert r.status_code == 200
    fine, nan, inf, also = r.json()["results"]
    assert fine["valid"] and also["valid"] and fine["score"] is not None
    for bad in (nan, inf):
        assert bad["error"] == "non_finite_score" and bad["score"] is None and not bad["valid"]
        assert bad["reward"] == 0.0
    assert ranked.status_code == 200 and all(x["error"] == "non_finite_score" for x in ranked.json()["results"])
    assert reward.status_code == 200 and reward.json()["rewards"] == [0.0]


async def test_out_of_memory_halves_the_batch_and_fails_only_the_item_that_cannot_fit(
    scorer: FaultScorer,
) -> None:
    scorer.oom_above = 2
    names = ["aaa", "bbb", OOM, "ddd"]  # equal lengths: the batch keeps arrival order
    async with app_client(app_for(scorer)) as client:
        r = await client.post("/v1/score", json={"items": [item(name) for name in names]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["error"] for x in results] == [None, None, "out_of_memory", None]
    assert results[0]["valid"] and results[3]["valid"] and not results[2]["valid"]
    # 4 items: too many -> halves; [aaa, bbb] fits; [OOM, ddd] -> [OOM] alone fails, [ddd] fits
    assert scorer.batches == [names, ["aaa", "bbb"], [OOM, "ddd"], [OOM], ["ddd"]]


async def test_a_slow_forward_turns_ready_503_until_it_finishes(scorer: FaultScorer) -> None:
    scorer.gate.clear()
    async with app_client(app_for(scorer, forward_timeout=0.1)) as client:
        pending = asyncio.create_task(client.post("/v1/score", json={"items": [item("slow")]}))
        await wait_for(lambda: _status(client, "/ready", 503), "/ready is 503")
        health = await client.get("/health")
        scorer.gate.set()
        r = await pending
        assert (await client.get("/ready")).status_code == 200
    assert health.status_code == 200  # alive, just not ready
    assert r.status_code == 200 and r.json()["results"][0]["valid"]


async def _status(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status


async def test_a_hung_forward_answers_504_keeps_ready_503_and_recovers_when_it_returns(
    scorer: FaultScorer,
) -> None:
    scorer.gate.clear()
    async with app_client(app_for(scorer, request_timeout=0.2, forward_timeout=0.2)) as client:
        hung = await asyncio.wait_for(client.post("/v1/score", json={"items": [item("hung")]}), 60)
        ready_while_hung = await client.get("/ready")
        scorer.gate.set()  # the model thread comes back
        await wait_for(lambda: _status(client, "/ready", 200), "/ready is 200 again")
        after = await client.post("/v1/score", json={"items": [item("after")]})
    assert hung.status_code == 504 and hung.json()["error"]["code"] == "timeout"
    assert ready_while_hung.status_code == 503
    assert after.status_code == 200


async def test_an_item_queued_past_the_request_timeout_gets_504_and_is_never_scored(
    scorer: FaultScorer,
) -> None:
    scorer.gate.clear()
    async with app_client(app_for(scorer, request_timeout=0.3, max_batch_items=1)) as client:
        first = asyncio.create_task(client.post("/v1/score", json={"items": [item("first")]}))
        await asyncio.to_thread(scorer.in_forward.wait)
        late = asyncio.create_task(client.post("/v1/score", json={"items": [item("late")]}))
        await wait_for(lambda: _queued(client, 1), "the late request is queued")
        await asyncio.sleep(0.4)  # longer than request_timeout: its deadline has passed
        scorer.gate.set()
        r_first, r_late = await first, await late
    assert r_first.status_code == 200
    assert r_late.status_code == 504 and r_late.json()["error"]["code"] == "timeout"
    assert scorer.batches == [["first"]]


def _send_and_abandon(url: str, problem: str) -> socket.socket:
    """Send a complete /v1/score request on a raw socket and return it unread (to close later)."""
    body = json.dumps({"items": [item(f"{problem}{i}") for i in range(3)]}).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _metric(url: str, name: str, labels: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_items_of_a_client_that_disconnected_never_reach_a_forward(scorer: FaultScorer) -> None:
    app = app_for(scorer)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        scorer.gate.clear()
        with httpx.Client(base_url=url, timeout=30) as other:
            blocker = _background(lambda: other.post("/v1/score", json={"items": [item("blocker")]}))
            assert scorer.in_forward.wait(30)
            gone = _send_and_abandon(url, "gone")
            _poll(lambda: client.get("/ready").json().get("queue_items") == 3, "the abandoned items are queued")
            gone.close()
            _poll(lambda: _metric(url, "codescaler_requests_total", 'status="499"') == 1,
                  "the server noticed the disconnect")
            scorer.gate.set()
            assert blocker().status_code == 200
        after = client.post("/v1/score", json={"items": [item("after")]})
    assert after.status_code == 200
    assert scorer.batches == [["blocker"], ["after"]]  # "gone0..2" never ran


def _poll(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def _background(call):  # type: ignore[no-untyped-def]
    """Run ``call`` in a thread; return a function that waits for and returns its result."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return lambda: future.result(timeout=60)
