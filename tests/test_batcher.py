"""The dynamic batcher, table-driven: given these queued items, expect these batches (no torch)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from models.base import EncodedItem, OutOfMemory
from service.batcher import Batcher, ItemScore
from service.errors import DeadlineExceeded, ItemFailed, Overloaded, ScoringFailed
from service.metrics import Metrics
from tests.helpers import RecordingScorer


def item(length: int, prefix: int = 0, tag: int = 0) -> EncodedItem:
    """An item of ``length`` tokens whose first 4 tokens identify its problem ``prefix``."""
    head = (prefix, prefix, prefix, prefix)
    return EncodedItem(head + tuple(range(tag, tag + length - 4)), 4)


def make(scorer: RecordingScorer, **overrides: float) -> Batcher:
    options = {"max_batch_tokens": 400, "max_batch_items": 8, "max_wait_ms": 20.0, "max_queue_items": 64}
    options.update(overrides)
    return Batcher(scorer, Metrics(), **options)  # type: ignore[arg-type]


async def run(batcher: Batcher, items: Sequence[EncodedItem], timeout: float = 30.0) -> list[object]:
    batcher.start()
    try:
        futures = batcher.submit(items, timeout)
        return await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await batcher.stop()


CASES = [
    # (id, lengths, prefixes, options, expected batches as lists of input positions)
    ("all fit in one", [10, 10, 10], [0, 0, 0], {}, [[0, 1, 2]]),
    ("item cap", [10] * 5, [0] * 5, {"max_batch_items": 2}, [[0, 1], [2, 3], [4]]),
    ("token budget counts padding", [100] * 5, [0] * 5, {"max_batch_tokens": 400}, [[0, 1, 2, 3], [4]]),
    ("similar lengths together", [10, 100, 12, 98], [1, 2, 3, 4], {"max_batch_tokens": 200},
     [[0, 2], [1, 3]]),
    ("shared problem first", [50, 50, 80], [1, 2, 1], {"max_batch_items": 2}, [[0, 2], [1]]),
    ("oldest always goes first", [300, 10, 10], [1, 2, 2], {"max_batch_tokens": 300}, [[0], [1, 2]]),
    ("an item as long as the budget still runs", [400, 400], [0, 0], {"max_batch_tokens": 400}, [[0], [1]]),
]


@pytest.mark.parametrize("lengths, prefixes, options, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_batches_are_composed_as_stated(lengths, prefixes, options, expected) -> None:  # type: ignore[no-untyped-def]
    scorer = RecordingScorer()
    items = [item(n, p, tag=i * 1000) for i, (n, p) in enumerate(zip(lengths, prefixes, strict=True))]
    results = await run(make(scorer, **options), items)
    position = {id(x): i for i, x in enumerate(items)}
    assert [[position[id(x)] for x in batch] for batch in scorer.batches] == expected
    # Each caller gets exactly its own score, whatever batch it was in.
    assert [r.score for r in results] == [scorer.expected(x) for x in items]  # type: ignore[union-attr]


async def test_items_past_their_deadline_are_answered_504_and_never_scored() -> None:
    scorer = RecordingScorer()
    results = await run(make(scorer), [item(10), item(10)], timeout=0.0)
    assert all(isinstance(r, DeadlineExceeded) for r in results)
    assert scorer.batches == []


async def test_cancelled_items_are_dropped_before_the_forward() -> None:
    scorer = RecordingScorer()
    batcher = make(scorer)
    batcher.start()
    keep, drop = item(10, tag=1), item(10, tag=2)
    futures = batcher.submit([keep, drop], 30.0)
    futures[1].cancel()
    result = await futures[0]
    await batcher.stop()
    assert isinstance(result, ItemScore)
    assert scorer.batches == [[keep]]


async def test_a_failing_forward_fails_its_batch_only() -> None:
    scorer = RecordingScorer()
    batcher = make(scorer)
    batcher.start()
    scorer.fail_with = RuntimeError("boom")
    failed = await asyncio.gather(*batcher.submit([item(10), item(10)], 30.0), return_exceptions=True)
    scorer.fail_with = None
    ok = await asyncio.gather(*batcher.submit([item(10)], 30.0))
    await batcher.stop()
    assert all(isinstance(r, ScoringFailed) for r in failed)
    assert "boom" not in str(failed[0])  # clients never see exception text
    assert isinstance(ok[0], ItemScore) and batcher.healthy is False  # stopped now


class OomAbove(RecordingScorer):
    """Runs out of memory on batches larger than ``limit``, and always on ``poison`` items."""

    def __init__(self, limit: int, poison: int = -1) -> None:
        super().__init__()
        self.limit, self.poison = limit, poison

    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        if len(items) > self.limit or any(x.length == self.poison for x in items):
            raise OutOfMemory("injected")
        return super().score(items)


async def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    scorer = OomAbove(limit=2)
    items = [item(10, tag=i * 100) for i in range(8)]
    results = await run(make(scorer), items)
    assert [len(b) for b in scorer.batches] == [2, 2, 2, 2]
    assert [r.score for r in results] == [scorer.expected(x) for x in items]  # type: ignore[union-attr]


async def test_an_item_that_alone_runs_out_of_memory_gets_a_per_item_error() -> None:
    scorer = OomAbove(limit=8, poison=13)
    items = [item(10), item(13), item(10, tag=7)]
    results = await run(make(scorer), items)
    assert isinstance(results[1], ItemFailed) and results[1].reason == "out_of_memory"
    assert isinstance(results[0], ItemScore) and isinstance(results[2], ItemScore)


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    scorer = RecordingScorer()
    batcher = make(scorer, max_queue_items=3)
    batcher.start()
    try:
        with pytest.raises(Overloaded) as refused:
            batcher.submit([item(10)] * 4, 30.0)
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert batcher.queued == 0  # all or nothing
    finally:
        await batcher.stop()
