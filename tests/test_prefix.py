"""Model tier: shared-prefix scoring equals a plain forward of each item alone, in fp32 on the tiny model.

Both runners (packed: no padding, prefixes cached across batches; padded: the
transformers cache) with prefix reuse on and off, mixed groups and lengths, one
truncated item; across batches through the prefix cache; and across single-sample
requests through the real Engine and Batcher.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from models.base import EncodedItem
from models.hf import HFScorer
from service.engine import Engine, ItemInput
from service.metrics import Metrics
from service.settings import Settings

TOL = 1e-5
MAX_LENGTH = 320  # small, so that the one long problem is cut in the middle
GROUP_SIZES = [1, 2, 3, 5, 9]


def problem(n: int) -> str:
    return f"Problem {n}: " + " ".join(f"read {w} numbers and print their sum" for w in range(3 + 4 * n))


def code(n: int, k: int) -> str:
    return "def solve(xs):\n" + "".join(f"    v{j} = sum(xs) * {k + j}\n" for j in range(1 + (k * 3 + n) % 7)) + "    return v0"


@pytest.fixture(scope="module")
def reference(tiny_dir: Path):  # type: ignore[no-untyped-def]
    """Score of one token sequence by a plain AutoModelForSequenceClassification forward."""
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()

    def score(item: EncodedItem) -> float:
        with torch.inference_mode():
            return float(model(input_ids=torch.tensor([item.input_ids])).logits[0, 0])

    return score


@pytest.fixture(scope="module", params=["packed", "padded"])
def scorer(request: pytest.FixtureRequest, model_cache: Path) -> HFScorer:
    """The tiny model behind each runner (packed is what the CPU uses by default)."""
    return HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", max_length=MAX_LENGTH,
                    packed=request.param == "packed")


@pytest.fixture(scope="module")
def mixed_items(scorer: HFScorer) -> list[EncodedItem]:
    """Groups of 1..9 answers to five problems, shuffled together, plus one truncated item."""
    items = [scorer.encode(problem(n), code(n, k)) for n, size in enumerate(GROUP_SIZES) for k in range(size)]
    items.append(scorer.encode(problem(40), code(0, 1)))
    random.Random(0).shuffle(items)
    return items


def test_runner_is_the_one_asked_for(scorer: HFScorer, request: pytest.FixtureRequest) -> None:
    assert scorer.info()["runner"] == request.node.callspec.params["scorer"]


@pytest.mark.parametrize("reuse", [True, False])
def test_mixed_groups_equal_each_item_alone(scorer: HFScorer, mixed_items: list[EncodedItem], reference,  # type: ignore[no-untyped-def]
                                            reuse: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scorer, "prefix_reuse", reuse)
    scorer.clear_prefix_cache()
    assert sum(item.truncated for item in mixed_items) == 1
    assert len({item.length for item in mixed_items}) > 10
    expected = [reference(item) for item in mixed_items]
    got = scorer.score(mixed_items)
    assert got == pytest.approx(expected, abs=TOL)
    assert max(expected) - min(expected) > 1000 * TOL  # the items really differ
    stats = scorer.last_stats
    assert stats is not None
    full = sum(item.length for item in mixed_items)
    if reuse:  # each shared problem ran once: far fewer tokens than the items hold
        shared_problems = sum(size - 1 for size in GROUP_SIZES) * min(item.prefix_len for item in mixed_items)
        assert stats.tokens <= full - shared_problems
    else:
        assert stats.tokens == full


def test_reuse_on_and_off_agree(scorer: HFScorer, mixed_items: list[EncodedItem],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scorer, "prefix_reuse", True)
    on = scorer.score(mixed_items)
    monkeypatch.setattr(scorer, "prefix_reuse", False)
    assert scorer.score(mixed_items) == pytest.approx(on, abs=TOL)


def test_a_problem_is_reused_from_the_cache_in_a_later_batch(model_cache: Path, reference) -> None:  # type: ignore[no-untyped-def]
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32")
    items = [scorer.encode(problem(3), code(3, k)) for k in range(5)]
    first = scorer.score(items[:1])
    assert scorer.last_stats is not None and scorer.last_stats.tokens == items[0].length
    later = scorer.score(items[1:])
    # Only what follows the problem ran: the problem's tokens came from the cache.
    assert scorer.last_stats.tokens == sum(item.length - items[0].prefix_len for item in items[1:])
    assert first + later == pytest.approx([reference(item) for item in items], abs=TOL)


def test_a_small_cache_forgets_and_still_scores_exactly(model_cache: Path, reference) -> None:  # type: ignore[no-untyped-def]
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32",
                      prefix_cache_tokens=150)  # room for one of these problems, not two
    items = [scorer.encode(problem(n), code(n, 1)) for n in (2, 3, 2)]
    assert items[0].prefix_len < 150 and items[1].prefix_len < 150 < items[0].prefix_len + items[1].prefix_len
    scores = [scorer.score([item])[0] for item in items]
    cache = scorer.runner.cache  # type: ignore[union-attr]
    assert len(cache) == 1 and cache.hits == 0  # problem 2 was evicted by 3, so it ran again
    assert scores == pytest.approx([reference(item) for item in items], abs=TOL)


async def test_single_sample_requests_share_a_problem_in_one_batch(model_cache: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """Eight one-item submissions of one problem, concurrently: one batch, the problem run once."""
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32",
                      prefix_cache_tokens=0)  # sharing must come from the batch, not from the cache
    # The batch closes when all eight are queued (max_batch_items), or after 5 s at worst.
    settings = Settings(model="tiny-random", max_batch_items=8, max_wait_ms=5000)  # type: ignore[call-arg]
    metrics = Metrics()
    engine = Engine(scorer, settings, metrics)
    await engine.start()
    try:
        tokens_before = metrics.registry.get_sample_value("codescaler_tokens_total") or 0.0
        inputs = [ItemInput(problem(5), f"```python\n{code(5, k)}\n```") for k in range(8)]
        outcomes = await asyncio.gather(*(engine.score([one]) for one in inputs))
        ran = (metrics.registry.get_sample_value("codescaler_tokens_total") or 0.0) - tokens_before
    finally:
        await engine.stop()
    items = [scorer.encode(problem(5), code(5, k)) for k in range(8)]
    assert [o[0].score for o in outcomes] == pytest.approx([reference(item) for item in items], abs=TOL)
    assert engine.batcher.forwards == 1
    assert ran <= sum(item.length for item in items) - 7 * items[0].prefix_len


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, softmax_scale: float | None = None,
                     causal: bool = False) -> torch.Tensor:
    """flash_attn_varlen_func's documented semantics in plain torch (causal aligned bottom-right, GQA)."""
    outs = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        groups = qi.shape[1] // ki.shape[1]
        ki, vi = ki.repeat_interleave(groups, 1), vi.repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * (softmax_scale or qi.shape[-1] ** -0.5)
        if causal:
            shift = ki.shape[0] - qi.shape[0]
            allowed = torch.arange(ki.shape[0])[None, :] <= torch.arange(qi.shape[0])[:, None] + shift
            scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi))
    return torch.cat(outs)


def test_the_flash_layout_computes_the_same_attention_as_the_cpu_cascade(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's segment and prefix layout, checked on CPU against a reference varlen kernel."""
    import sys
    import types

    from models import varlen

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=reference_varlen))
    torch.manual_seed(0)
    heads, kv_heads, dim, lengths = 4, 2, 8, [5, 7, 3, 6]  # segment 0 alone, 1-3 continue prefix 0 or 1
    total = sum(lengths)
    query = torch.randn(1, total, heads, dim).transpose(1, 2)
    key, value = torch.randn(1, total, kv_heads, dim).transpose(1, 2), torch.randn(1, total, kv_heads, dim).transpose(1, 2)
    states = [[(torch.randn(kv_heads, n, dim), torch.randn(kv_heads, n, dim))] for n in (9, 4)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    bounds = [(s, s + n) for s, n in zip(starts, lengths, strict=True)]

    def packed(fn):  # type: ignore[no-untyped-def]
        p = varlen.PackedPass(bounds, [None, 0, 0, 1], states, {0: []})  # type: ignore[arg-type]
        return fn(query, key, value, p, 0, 0.3), p.capture

    cpu, cpu_captured = packed(varlen._cpu_packed)
    flash, flash_captured = packed(varlen._flash_packed)
    assert cpu.shape == flash.shape == (1, total, heads, dim)
    assert torch.allclose(cpu, flash, atol=1e-5)
    assert torch.equal(cpu_captured[0][0][0], flash_captured[0][0][0])
    assert torch.equal(cpu_captured[0][0][0], key[0, :, 0:5])


@pytest.mark.gpu
def test_flash_attention_packed_scores_equal_the_plain_forward(model_cache: Path, reference) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("flash_attn")
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cuda", dtype="bfloat16",
                      attn_implementation="flash_attention_2", max_length=MAX_LENGTH)
    assert scorer.info()["runner"] == "packed"
    items = [scorer.encode(problem(n), code(n, k)) for n, size in enumerate(GROUP_SIZES) for k in range(size)]
    expected = [reference(item) for item in items]  # fp32 on the CPU
    scorer.prefix_reuse = True
    shared = scorer.score(items)
    scorer.prefix_reuse = False
    plain = scorer.score(items)
    assert shared == pytest.approx(expected, abs=3e-2) and plain == pytest.approx(expected, abs=3e-2)
