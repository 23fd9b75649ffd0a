"""Model tier: shared-prefix scoring equals a plain forward of each item alone, in fp32 on the tiny model.

Every way a batch can run: the packed runner with the CPU's fused kernel, the packed
runner with the reference kernel of the CUDA contract (so every line of the CUDA path
but the kernel call runs here), the same with forwards small enough to split groups
across forwards, and the padded runner; prefix reuse on and off, mixed groups and
lengths, one truncated item; across batches through the prefix cache; and across
single-sample requests through the real Engine and Batcher.
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
from models.prefix import PrefixCache
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


#: name -> HFScorer options: the CPU default, the CUDA path on the reference kernel, the
#: same with forwards of 256 tokens (groups split across forwards), the padded fallback.
RUNNERS = {
    "packed-cpu": {"kernel": "cpu_fused"},
    "packed-cuda-path": {"kernel": "reference", "chunk_tokens": 2048},
    "packed-cuda-path-small": {"kernel": "reference", "chunk_tokens": 256},
    "padded": {"packed": False},
}


@pytest.fixture(scope="module", params=list(RUNNERS))
def scorer(request: pytest.FixtureRequest, model_cache: Path) -> HFScorer:
    """The tiny model behind each runner (packed-cpu is what the CPU uses by default)."""
    return HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", max_length=MAX_LENGTH,
                    prefix_cache_bytes=1 << 24, **RUNNERS[request.param])


@pytest.fixture(scope="module")
def mixed_items(scorer: HFScorer) -> list[EncodedItem]:
    """Groups of 1..9 answers to five problems, shuffled together, plus one truncated item."""
    items = [scorer.encode(problem(n), code(n, k)) for n, size in enumerate(GROUP_SIZES) for k in range(size)]
    items.append(scorer.encode(problem(40), code(0, 1)))
    random.Random(0).shuffle(items)
    return items


def test_runner_is_the_one_asked_for(scorer: HFScorer, request: pytest.FixtureRequest) -> None:
    name = request.node.callspec.params["scorer"]
    assert scorer.info()["runner"] == name.split("-")[0]
    assert scorer.info()["attention_kernel"] == RUNNERS[name].get("kernel")


@pytest.mark.parametrize("reuse", [True, False])
def test_mixed_groups_equal_each_item_alone(scorer: HFScorer, mixed_items: list[EncodedItem], reference,  # type: ignore[no-untyped-def]
                                            reuse: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scorer, "prefix_reuse", reuse)
    scorer.clear_prefix_cache()
    assert sum(item.truncated for item in mixed_items) == 1
    assert len({item.length for item in mixed_items}) > 10
    expected = [reference(item) for item in mixed_items]
    got, stats = scorer.score_with_stats(mixed_items)
    assert got == pytest.approx(expected, abs=TOL)
    assert max(expected) - min(expected) > 1000 * TOL  # the items really differ
    assert stats is not None
    full = sum(item.length for item in mixed_items)
    if reuse:  # each shared problem ran once: far fewer tokens than the items hold
        shared_problems = sum(size - 1 for size in GROUP_SIZES) * min(item.prefix_len for item in mixed_items)
        assert stats.tokens <= full - shared_problems
    else:
        assert stats.tokens == full


def test_prefixes_from_the_cache_give_the_same_scores(scorer: HFScorer, mixed_items: list[EncodedItem],
                                                      reference) -> None:  # type: ignore[no-untyped-def]
    """The second run of the batch reads every problem's states from the prefix cache."""
    scorer.prefix_reuse = True
    scorer.clear_prefix_cache()
    scorer.score(mixed_items)
    again, stats = scorer.score_with_stats(mixed_items)
    assert again == pytest.approx([reference(item) for item in mixed_items], abs=TOL)
    if scorer.info()["runner"] == "packed":
        assert stats is not None and stats.tokens < sum(item.length for item in mixed_items) // 2


def test_reuse_on_and_off_agree(scorer: HFScorer, mixed_items: list[EncodedItem],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scorer, "prefix_reuse", True)
    on = scorer.score(mixed_items)
    monkeypatch.setattr(scorer, "prefix_reuse", False)
    assert scorer.score(mixed_items) == pytest.approx(on, abs=TOL)


@pytest.mark.parametrize("kernel", ["cpu_fused", "reference"])
def test_a_problem_is_reused_from_the_cache_in_a_later_batch(model_cache: Path, reference, kernel: str) -> None:  # type: ignore[no-untyped-def]
    """The only item of a problem runs whole; its first tokens' states serve the later rollouts."""
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", kernel=kernel)
    items = [scorer.encode(problem(3), code(3, k)) for k in range(5)]
    first, stats = scorer.score_with_stats(items[:1])
    assert stats is not None and stats.tokens == items[0].length
    later, stats = scorer.score_with_stats(items[1:])
    # Only what follows the problem ran: the problem's tokens came from the cache.
    assert stats is not None and stats.tokens == sum(item.length - items[0].prefix_len for item in items[1:])
    assert first + later == pytest.approx([reference(item) for item in items], abs=TOL)


def test_a_small_cache_forgets_and_still_scores_exactly(model_cache: Path, reference) -> None:  # type: ignore[no-untyped-def]
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32")
    scorer.runner.cache = PrefixCache(scorer.runner.prefix_bytes(150))  # type: ignore[union-attr]  # one problem, not two
    items = [scorer.encode(problem(n), code(n, 1)) for n in (2, 3, 2)]
    assert items[0].prefix_len < 150 and items[1].prefix_len < 150 < items[0].prefix_len + items[1].prefix_len
    scores = [scorer.score([item])[0] for item in items]
    cache = scorer.runner.cache  # type: ignore[union-attr]
    assert len(cache) == 1 and cache.hits == 0  # problem 2 was evicted by 3, so it ran again
    assert scores == pytest.approx([reference(item) for item in items], abs=TOL)


async def test_single_sample_requests_share_a_problem_in_one_batch(model_cache: Path, reference) -> None:  # type: ignore[no-untyped-def]
    """Eight one-item submissions of one problem, concurrently: one batch, the problem run once."""
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32",
                      prefix_cache_bytes=0)  # sharing must come from the batch, not from the cache
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_packed_scores_equal_the_plain_forward(model_cache: Path, reference, dtype: str) -> None:  # type: ignore[no-untyped-def]
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cuda", dtype=dtype, max_length=MAX_LENGTH)
    scorer.warmup()  # includes the kernel's contract check on the device
    kernel = "torch_varlen" if dtype == "bfloat16" else "reference"  # FlashAttention has no fp32 kernel
    assert scorer.info()["runner"] == "packed" and scorer.info()["attention_kernel"].startswith(kernel)
    items = [scorer.encode(problem(n), code(n, k)) for n, size in enumerate(GROUP_SIZES) for k in range(size)]
    expected = [reference(item) for item in items]  # fp32 on the CPU
    tol = 3e-2 if dtype == "bfloat16" else 1e-4
    scorer.prefix_reuse = True
    shared = scorer.score(items)
    cached = scorer.score(items)
    scorer.prefix_reuse = False
    plain = scorer.score(items)
    for got in (shared, cached, plain):
        assert got == pytest.approx(expected, abs=tol)
