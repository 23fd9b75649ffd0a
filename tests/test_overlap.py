"""Overlap: a new request is extracted and tokenized while the model thread is busy with a forward.

No timing: the forward blocks on an event until the test has seen the second
request's encode happen, so the order of events is the proof.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from models.base import EncodedItem
from service.engine import Engine, ItemInput
from service.metrics import Metrics
from service.settings import Settings
from tests.helpers import FakeScorer

CODE = "```python\nprint(1)\n```"


class GatedScorer(FakeScorer):
    """A forward waits for ``gate``; ``encoded`` lists the problems tokenized, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.in_forward = threading.Event()
        self.encoded: list[str] = []
        self.encoded_during_forward: list[str] = []
        self.batches: list[int] = []

    def encode(self, problem: str, code: str) -> EncodedItem:
        if self.in_forward.is_set() and not self.gate.is_set():
            self.encoded_during_forward.append(problem)
        self.encoded.append(problem)
        return super().encode(problem, code)

    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        self.batches.append(len(items))
        self.in_forward.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().score(items)


async def wait_for(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition`` (a liveness bound, not a timing check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


async def test_the_next_request_is_tokenized_while_a_forward_runs() -> None:
    scorer = GatedScorer()
    engine = Engine(scorer, Settings(model="fake", max_wait_ms=0), Metrics())  # type: ignore[call-arg]
    await engine.start()
    try:
        first = asyncio.create_task(engine.score([ItemInput("first", CODE)]))
        await wait_for(scorer.in_forward.is_set, "the first forward started")
        second = asyncio.create_task(engine.score([ItemInput("second", CODE)]))
        await wait_for(lambda: engine.batcher.queued == 1, "the second item was tokenized and queued")
        # The model thread is still inside the first forward, and the second item is ready for the next.
        assert not first.done() and not scorer.gate.is_set()
        assert scorer.encoded == ["first", "second"] and scorer.encoded_during_forward == ["second"]
        scorer.gate.set()
        results = await asyncio.gather(first, second)
    finally:
        scorer.gate.set()
        await engine.stop()
    assert [r[0].valid for r in results] == [True, True]
    assert scorer.batches == [1, 1]
