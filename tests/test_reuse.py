"""Work not repeated, on the tiny model through the real Engine and Batcher.

- Cost-aware batches: 16 rollouts of a 3,000-token problem with 500-token answers cost
  3,000 + 16 x 500 tokens packed and run in one forward of a 16,384-token budget; the
  padded runner, which pays items x longest, needs four.
- Identical inputs run once, in a batch and across batches (result cache); each still
  gets its answer; codescaler_tokens_total counts only what ran.
- The score head runs in float32 whatever the model's dtype.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from models.hf import HFScorer
from service.engine import Engine, ItemInput
from service.metrics import Metrics
from service.settings import Settings

PROBLEM = "Count the words. " + " ".join(f"w{k}" for k in range(770))  # ~3,000 tokens


def answer(k: int) -> str:
    return f"```python\ndef solve(s):\n    return len(s.split()) + {k}  # " + " ".join(f"c{j}" for j in range(135)) + "\n```"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def run_rollouts(scorer: HFScorer) -> tuple[Engine, int, list[float]]:
    """16 single-item requests at once; returns the engine, model forwards run and the scores."""
    settings = Settings(model="tiny-random", max_batch_items=16, max_wait_ms=5000)  # type: ignore[call-arg]
    engine = Engine(scorer, settings, Metrics())
    forwards = 0

    def count(*_: object) -> None:
        nonlocal forwards
        forwards += 1

    await engine.start()
    hook = scorer.model.base_model.register_forward_hook(count)
    try:
        outcomes = await asyncio.gather(*(engine.score([ItemInput(PROBLEM, answer(k))]) for k in range(16)))
    finally:
        hook.remove()
        await engine.stop()
    return engine, forwards, [o[0].score for o in outcomes]  # type: ignore[misc]


async def test_sixteen_long_rollouts_run_in_one_packed_forward(model_cache: Path) -> None:
    packed = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", chunk_tokens=16384,
                      prefix_cache_bytes=0)
    items = [packed.encode(PROBLEM, answer(k).split("\n", 1)[1].rsplit("\n", 1)[0]) for k in range(16)]
    assert all(2900 <= i.prefix_len <= 3100 and 450 <= i.length - i.prefix_len <= 550 for i in items)
    engine, forwards, scores = await run_rollouts(packed)
    assert engine.batcher.forwards == 1 and forwards == 1
    lone = [packed.score([item])[0] for item in items]
    assert scores == pytest.approx(lone, abs=1e-5)


@pytest.mark.slow
async def test_the_padded_runner_pays_items_times_longest(model_cache: Path) -> None:
    padded = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", packed=False)
    engine, _, _ = await run_rollouts(padded)
    assert engine.batcher.forwards == 4  # 4 x 3,500 <= 16,384 < 5 x 3,500


async def test_identical_inputs_run_once_and_each_gets_its_answer(model_cache: Path) -> None:
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", prefix_cache_bytes=0)
    settings = Settings(model="tiny-random", max_wait_ms=50)  # type: ignore[call-arg]
    metrics = Metrics()
    engine = Engine(scorer, settings, metrics)
    await engine.start()
    inputs = [ItemInput("Add two numbers.", f"```python\nprint(1 + {k})\n```") for k in (1, 2, 1, 3, 1)]
    distinct = [scorer.encode("Add two numbers.", f"print(1 + {k})") for k in (1, 2, 3)]
    try:
        before = sample(metrics, "codescaler_tokens_total")
        first = await engine.score(inputs)
        ran_first = sample(metrics, "codescaler_tokens_total") - before
        second = await engine.score(inputs)
        ran_second = sample(metrics, "codescaler_tokens_total") - before - ran_first
    finally:
        await engine.stop()
    _, stats = scorer.score_with_stats(distinct)
    assert stats is not None and ran_first == stats.tokens  # three distinct inputs ran, not five
    assert ran_second == 0  # all five answered from the result cache
    assert sample(metrics, "codescaler_results_reused_total", source="batch") == 2
    assert sample(metrics, "codescaler_results_reused_total", source="cache") == 5
    lone = [scorer.score([item])[0] for item in distinct]
    expected = [lone[0], lone[1], lone[0], lone[2], lone[0]]
    assert [o.score for o in first] == pytest.approx(expected, abs=1e-5)
    assert [o.score for o in second] == [o.score for o in first]
    assert all(o.valid for o in first + second)
    assert sample(metrics, "codescaler_items_total", extraction_status="ok") == 10  # every item counted


def test_the_score_head_runs_in_float32_for_a_bfloat16_model(model_cache: Path) -> None:
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="bfloat16")
    assert scorer.model.score.weight.dtype == torch.float32
    assert next(scorer.model.base_model.parameters()).dtype == torch.bfloat16
    items = [scorer.encode("Sum a list.", f"print(sum(range({k})))") for k in range(16)]
    scores = scorer.score(items)
    on_bf16_grid = [float(torch.tensor(s).to(torch.bfloat16)) == s for s in scores]
    assert sum(on_bf16_grid) < 4  # a bf16 head would put every score on the bf16 grid
    exact = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32")
    assert scores == pytest.approx(exact.score(items), abs=5e-2)
