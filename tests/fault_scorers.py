"""A test-only scorer that misbehaves on demand: raises, returns NaN, hangs, runs out of memory.

Faults are chosen per item by a marker in its problem text (so one request can mix
good and bad items) or for every batch by an attribute (so a test can flip them).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from models.base import EncodedItem, OutOfMemory
from tests.helpers import FakeScorer

NAN = "NAN"  # the item scores NaN
INF = "INF"  # the item scores +inf
OOM = "OOM"  # any batch holding this item runs out of memory, even alone
RAISE = "RAISE"  # any batch holding this item raises RuntimeError


def problem_of(item: EncodedItem) -> str:
    """The problem text an item was encoded from (FakeScorer keeps ASCII characters as their codes)."""
    return "".join(chr(i) for i in item.input_ids[3 : item.prefix_len - 4])


class FaultScorer(FakeScorer):
    """FakeScorer with a gate (a forward blocks while it is closed) and fault markers.

    ``gate``: set = open; a test clears it to hold the next forward and sets it to let go.
    ``in_forward``: set while a forward is running (a test waits on it before acting).
    ``oom_above``: batches of more items than this raise OutOfMemory.
    ``batches``: the problems of every batch, in order, to check what reached the model.
    ``encoded``: how many items were tokenized (limits must refuse before this).
    """

    def __init__(self, max_length: int = 4096) -> None:
        super().__init__(max_length)
        self.gate = threading.Event()
        self.gate.set()
        self.in_forward = threading.Event()
        self.oom_above: int | None = None
        self.batches: list[list[str]] = []
        self.encoded = 0

    def encode(self, problem: str, code: str) -> EncodedItem:
        self.encoded += 1
        return super().encode(problem, code)

    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        problems = [problem_of(item) for item in items]
        self.batches.append(problems)
        self.in_forward.set()
        try:
            self.gate.wait()
            if any(OOM in p for p in problems) or (self.oom_above is not None and len(items) > self.oom_above):
                self.calls.append(len(items))
                raise OutOfMemory("simulated")
            if any(RAISE in p for p in problems):
                self.calls.append(len(items))
                raise RuntimeError("simulated failure at /secret/path")
            scores = super().score(items)  # honours fail_with and delay
        finally:
            self.in_forward.clear()
        return [math.nan if NAN in p else math.inf if INF in p else s for p, s in zip(problems, scores, strict=True)]
