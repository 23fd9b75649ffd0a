"""Memory faults on CPU: an injected out-of-memory halves the batch, a lone failure is per item, /ready stays 200.

The fault is injected around the real tiny model (batches of more than ``k`` items,
or any batch holding a poisoned item, run out of memory), so the scores that do
come back are real model scores; the app is the real one, in process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from models.base import EncodedItem, OutOfMemory, Scorer
from models.hf import HFScorer
from service.app import create_app
from service.settings import Settings
from tests.helpers import app_client


class OOMAbove(Scorer):
    """Wraps a scorer: more than ``k`` items, or a poisoned item, in a batch -> OutOfMemory."""

    def __init__(self, inner: HFScorer, k: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_length = inner.max_length
        self.k = k
        self.poisoned: set[tuple[int, ...]] = set()
        self.attempts: list[int] = []  # batch sizes tried, in order

    def encode(self, problem: str, code: str) -> EncodedItem:
        return self.inner.encode(problem, code)

    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        self.attempts.append(len(items))
        if len(items) > self.k or any(item.input_ids in self.poisoned for item in items):
            raise OutOfMemory(f"injected: {len(items)} items")
        scores = self.inner.score(items)
        self.last_stats = self.inner.last_stats
        return scores


def response(k: int) -> str:
    return f"```python\nprint({k} * {k})\n```"


@pytest.fixture(scope="module")
def inner(model_cache: Path) -> HFScorer:
    return HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32")


async def test_oom_halves_the_batch_and_fails_only_the_item_that_never_fits(inner: HFScorer) -> None:
    scorer = OOMAbove(inner, k=2)
    poisoned = inner.encode("Square it.", "print(5 * 5)")
    scorer.poisoned.add(poisoned.input_ids)
    items = [{"problem": "Square it.", "response": response(k)} for k in range(8)]
    expected = [inner.score([inner.encode("Square it.", f"print({k} * {k})")])[0] for k in range(8)]
    app = create_app(Settings(model="tiny-random"), scorer)  # type: ignore[call-arg]
    async with app_client(app) as client:
        r = await client.post("/v1/score", json={"items": items, "shaping": "none"})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[5]["error"] == "out_of_memory" and results[5]["score"] is None
        others = [i for i in range(8) if i != 5]
        assert all(results[i]["error"] is None for i in others)
        assert [results[i]["score"] for i in others] == pytest.approx([expected[i] for i in others], abs=1e-5)
        # 8 -> 4 + 4 -> 2 + 2 + 2 + 2, and the pair holding the poisoned item -> 1 + 1.
        assert scorer.attempts == [8, 4, 2, 2, 4, 2, 1, 1, 2]
        ready = await client.get("/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        again = await client.post("/v1/score", json={"items": items[:2]})
        assert again.status_code == 200 and all(x["valid"] for x in again.json()["results"])


def test_a_torch_oom_becomes_out_of_memory_and_frees_the_prefix_cache(inner: HFScorer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    items = [inner.encode("Square it.", f"print({k})") for k in range(3)]
    inner.score(items)
    assert len(inner.runner.cache) == 1  # type: ignore[union-attr]

    def out_of_memory(batch: Sequence[EncodedItem]) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(inner.runner, "run", out_of_memory)
    with pytest.raises(OutOfMemory):
        inner.score(items)
    assert len(inner.runner.cache) == 0  # type: ignore[union-attr]
