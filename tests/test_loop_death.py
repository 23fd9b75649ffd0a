"""No silent death, over loopback (a real uvicorn, FaultScorer): however the batch loop ends,
every queued and in-flight item is answered at once with 503 + Retry-After, /ready turns
503 and the log says why; stop() answers the batch in a forward."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import pytest

from service.app import create_app
from service.batcher import Batcher
from service.errors import NotReady
from service.metrics import Metrics
from service.settings import Settings
from tests.fake_server import serve_in_thread
from tests.fault_scorers import FaultScorer
from tests.helpers import FakeScorer

pytestmark = pytest.mark.slow
CODE = "```python\ndef f(x):\n    return x + 1\n```"


def body(name: str) -> dict[str, object]:
    return {"items": [{"problem": name, "response": CODE}]}


def poll(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


async def post_all(url: str, names: list[str]) -> list[asyncio.Task[httpx.Response]]:
    async def post(name: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await client.post("/v1/score", json=body(name))
    return [asyncio.create_task(post(name)) for name in names]


def run_scenario(fault_scorer: FaultScorer, kill: Callable[[Batcher, asyncio.AbstractEventLoop], None],
                 open_gate_first: bool) -> tuple[list[httpx.Response], httpx.Response]:
    """One request in a held forward, two queued behind it; then ``kill`` the loop."""
    app = create_app(Settings(model="fake", max_wait_ms=0), fault_scorer)  # type: ignore[arg-type]
    fault_scorer.gate.clear()
    with serve_in_thread(app) as url:
        batcher: Batcher = app.state.engine.batcher
        server_loop = batcher._task.get_loop()  # type: ignore[union-attr]

        async def scenario() -> tuple[list[httpx.Response], httpx.Response]:
            first = await post_all(url, ["in-flight"])
            await asyncio.to_thread(fault_scorer.in_forward.wait, 30)
            queued = await post_all(url, ["queued-1", "queued-2"])
            await asyncio.to_thread(poll, lambda: batcher.queued == 2, "two items are queued")
            server_loop.call_soon_threadsafe(kill, batcher, server_loop)
            if open_gate_first:
                fault_scorer.gate.set()
            answers = list(await asyncio.gather(*first, *queued))  # with the gate still held, if not opened
            async with httpx.AsyncClient(base_url=url) as client:
                ready = await client.get("/ready")
            return answers, ready

        answers, ready = asyncio.run(scenario())
        fault_scorer.gate.set()
    return answers, ready


def test_a_bug_in_the_loop_answers_the_queue_and_turns_ready_503(
    fault_scorer: FaultScorer, caplog: pytest.LogCaptureFixture
) -> None:
    def plant_bug(batcher: Batcher, _loop: asyncio.AbstractEventLoop) -> None:
        def broken() -> None:
            raise RuntimeError("a bug in batch selection")
        batcher._take = broken  # type: ignore[method-assign]  # runs right after the held forward

    with caplog.at_level(logging.CRITICAL, logger="codescaler.batcher"):
        answers, ready = run_scenario(fault_scorer, plant_bug, open_gate_first=True)
    in_flight, *queued = answers
    assert in_flight.status_code == 200
    assert [r.status_code for r in queued] == [503, 503]
    assert all(r.headers["retry-after"] and r.json()["error"]["code"] == "not_ready" for r in queued)
    assert ready.status_code == 503
    assert "batch loop died: RuntimeError" in caplog.text and "a bug in batch selection" in caplog.text


def test_a_loop_cancelled_mid_forward_answers_the_in_flight_batch_at_once(fault_scorer: FaultScorer) -> None:
    def cancel(batcher: Batcher, _loop: asyncio.AbstractEventLoop) -> None:
        batcher._task.cancel()  # type: ignore[union-attr]

    # The gate stays closed until every answer is in: nobody waits for a model that may never return.
    answers, ready = run_scenario(fault_scorer, cancel, open_gate_first=False)
    assert [r.status_code for r in answers] == [503, 503, 503]
    assert all(r.headers["retry-after"] for r in answers)
    assert ready.status_code == 503


async def test_stop_answers_the_batch_in_a_forward() -> None:
    fault_scorer = FaultScorer()
    fault_scorer.gate.clear()
    batcher = Batcher(fault_scorer, Metrics(), max_batch_tokens=4096, max_batch_items=8, max_wait_ms=0,
                      max_queue_items=16)
    batcher.start()
    item = FakeScorer().encode("p", "x = 1")
    in_flight = batcher.submit([item], timeout=60)
    await asyncio.to_thread(fault_scorer.in_forward.wait, 30)
    queued = batcher.submit([item], timeout=60)
    await batcher.stop()
    fault_scorer.gate.set()
    for future in in_flight + queued:
        assert isinstance(future.exception(), NotReady)
        assert future.exception().headers["Retry-After"]  # type: ignore[union-attr]
    assert not batcher.healthy and batcher.stopped_because == "stopped"
