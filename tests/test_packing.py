"""Packing and prefix bookkeeping as tables (no torch), then the padding each runner reports on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.base import EncodedItem
from models.packing import chunk_by_tokens, pack_by_length, padding_ratio
from models.prefix import (
    CachedPrefix,
    PrefixCache,
    common_prefix_len,
    group_by_problem,
    shared_len,
)


@pytest.mark.parametrize(("lengths", "max_tokens", "max_items", "max_padding", "expected"), [
    ([], 100, 8, 0.05, []),
    ([10, 10, 10], 100, 8, 0.05, [[0, 1, 2]]),
    ([10, 10, 10], 100, 2, 0.05, [[0, 1], [2]]),  # item limit
    ([30, 30, 30, 30], 100, 8, 0.05, [[0, 1, 2], [3]]),  # 4 * 30 > 100 padded tokens
    ([50, 100, 51], 1000, 8, 0.05, [[0, 2], [1]]),  # sorted by length; 100 would pad the 50s by half
    ([50, 100, 51], 1000, 8, 1.0, [[0, 2, 1]]),  # padding check off
    ([500, 5], 100, 8, 0.05, [[1], [0]]),  # an item over the budget still gets a chunk of its own
])
def test_pack_by_length(lengths: list[int], max_tokens: int, max_items: int, max_padding: float,
                        expected: list[list[int]]) -> None:
    assert pack_by_length(lengths, max_tokens, max_items, max_padding) == expected


@pytest.mark.parametrize("seed", range(5))
def test_pack_by_length_keeps_every_item_once_within_limits(seed: int) -> None:
    import random

    rng = random.Random(seed)
    lengths = [rng.randrange(1, 400) for _ in range(200)]
    chunks = pack_by_length(lengths, 2048, 16, 0.05)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(200))
    for chunk in chunks:
        sizes = [lengths[i] for i in chunk]
        assert len(chunk) <= 16 and (len(chunk) == 1 or len(chunk) * max(sizes) <= 2048)
        assert padding_ratio(sizes) <= 0.05


@pytest.mark.parametrize(("lengths", "max_tokens", "expected"), [
    ([], 10, []),
    ([3, 3, 3], 10, [[0, 1, 2]]),
    ([3, 3, 3, 3], 10, [[0, 1, 2], [3]]),
    ([12, 3, 3], 10, [[0], [1, 2]]),  # longer than the budget: alone
    ([5, 12, 5], 10, [[0], [1], [2]]),
    ([4, 6, 1], 10, [[0, 1], [2]]),  # order is kept (segments of a prefix stay together)
])
def test_chunk_by_tokens(lengths: list[int], max_tokens: int, expected: list[list[int]]) -> None:
    assert chunk_by_tokens(lengths, max_tokens) == expected


def item(ids: str, prefix_len: int) -> EncodedItem:
    """An item whose tokens are the characters' codes (readable tables)."""
    return EncodedItem(tuple(map(ord, ids)), prefix_len)


def test_common_prefix_len() -> None:
    assert common_prefix_len([]) == 0
    assert common_prefix_len([(1, 2, 3)]) == 3
    assert common_prefix_len([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2
    assert common_prefix_len([(1,), (2,)]) == 0


def test_group_by_problem_keeps_first_appearance_order_and_keyless_items_alone() -> None:
    items = [item("PPab", 2), item("QQx", 2), item("PPcd", 2), item("zz", 0), item("QQy", 2), item("zz", 0)]
    assert group_by_problem(items) == [((80, 80), [0, 2]), ((81, 81), [1, 4]), (None, [3]), (None, [5])]


@pytest.mark.parametrize(("texts", "prefix_len", "expected"), [
    (["PPPab", "PPPac"], 3, 4),  # the common prefix goes past the problem
    (["PPPab", "PPPab"], 3, 4),  # identical items: each keeps its last token
    (["PPPabc"], 3, 3),  # one item: its problem only (what later items of the problem can reuse)
    (["PPPa"], 3, 3),
    (["PPP"], 3, 2),  # nothing after the problem: the last token stays with the item
])
def test_shared_len(texts: list[str], prefix_len: int, expected: int) -> None:
    items = [item(t, prefix_len) for t in texts]
    assert shared_len(items, list(range(len(items)))) == expected


def test_prefix_cache_evicts_the_least_recently_used_within_its_token_bound() -> None:
    cache = PrefixCache(max_tokens=10)
    cache.put((1,), CachedPrefix((1,) * 4, "a"))
    cache.put((2,), CachedPrefix((2,) * 4, "b"))
    assert cache.get((1,)) is not None  # now (2,) is the least recently used
    cache.put((3,), CachedPrefix((3,) * 4, "c"))
    assert cache.get((2,)) is None and cache.get((1,)) is not None and cache.get((3,)) is not None
    assert cache.tokens == 8 and cache.hits == 3
    cache.put((4,), CachedPrefix((4,) * 11, "too big"))  # larger than the bound: not kept
    assert cache.get((4,)) is None and len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.tokens == 0


def test_a_cache_of_zero_tokens_keeps_nothing() -> None:
    cache = PrefixCache(max_tokens=0)
    cache.put((1,), CachedPrefix((1,), "a"))
    assert cache.get((1,)) is None


# --------------------------------------------------------------- model tier: padding per batch
def mixed_lengths(scorer) -> list[EncodedItem]:  # type: ignore[no-untyped-def]
    """Twelve items of twelve different problems and lengths (nothing to share)."""
    return [scorer.encode(f"Problem {n}: " + "sum the numbers " * (3 * n), "print(1)\n" * (1 + 2 * n))
            for n in range(12)]


def test_packed_batches_have_no_padding(tiny_scorer) -> None:  # type: ignore[no-untyped-def]
    items = mixed_lengths(tiny_scorer)
    assert len({i.length for i in items}) == 12
    tiny_scorer.score(items)
    stats = tiny_scorer.last_stats
    assert stats is not None and stats.padding_ratio == 0.0 and stats.tokens == sum(i.length for i in items)


def test_padded_batches_of_mixed_lengths_stay_within_max_padding(model_cache: Path) -> None:
    from models.hf import HFScorer

    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", packed=False,
                      prefix_reuse=False)
    items = mixed_lengths(scorer)
    assert padding_ratio([i.length for i in items]) > 0.3  # one padded batch of all would waste a third
    scorer.score(items)
    stats = scorer.last_stats
    assert stats is not None and stats.tokens == sum(i.length for i in items)
    assert 0.0 < stats.padding_ratio <= 0.05
