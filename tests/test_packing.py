"""Packing and prefix bookkeeping as tables (no torch), then the padding each runner reports on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.base import EncodedItem
from models.packing import pack_by_length, padding_ratio
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


def entry(key: int, nbytes: int) -> CachedPrefix:
    return CachedPrefix((key,) * 4, f"states of {key}", nbytes)


def test_prefix_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    cache = PrefixCache(max_bytes=1000, protected_share=1.0)
    cache.put((1,), entry(1, 400))
    cache.put((2,), entry(2, 400))
    cache.put((3,), entry(3, 400))  # 1200 > 1000: the oldest, (1,), goes
    assert (1,) not in cache and (2,) in cache and (3,) in cache and cache.bytes == 800
    cache.put((4,), entry(4, 1001))  # larger than the whole bound: not kept, nothing evicted
    assert (4,) not in cache and len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_reused_prefixes_survive_a_stream_of_one_off_problems() -> None:
    """GRPO groups' problems (used again) outlive a flood of problems seen once."""
    cache = PrefixCache(max_bytes=1000)  # protected: at most 800 bytes
    for key in (1, 2):
        cache.put((key,), entry(key, 100))
        assert cache.get((key,)) is not None  # a second rollout of the group: now protected
    for one_off in range(100, 200):  # each one-off enters probation and pushes the previous out
        cache.put((one_off,), entry(one_off, 300))
        assert (1,) in cache and (2,) in cache and (one_off,) in cache
    assert cache.bytes <= 1000 and cache.hits == 2


def test_the_first_rollout_leaves_its_prefix_for_the_next_ones() -> None:
    cache = PrefixCache(max_bytes=1000)
    for key in range(8):  # protected full of reused problems
        cache.put((key,), entry(key, 100))
        cache.get((key,))
    cache.put((50,), entry(50, 400))  # a new group's first rollout, over the bound with the rest
    assert cache.get((50,)) is not None  # the newest entry is never the one evicted
    assert cache.bytes <= 1000


def test_protected_overflow_is_demoted_not_dropped() -> None:
    cache = PrefixCache(max_bytes=1000, protected_share=0.5)
    for key in (1, 2, 3):
        cache.put((key,), entry(key, 200))
        cache.get((key,))
    assert len(cache) == 3 and cache.bytes == 600  # (1,) moved back to probation, still kept


def test_a_cache_of_zero_bytes_keeps_nothing() -> None:
    cache = PrefixCache(max_bytes=0)
    cache.put((1,), entry(1, 1))
    assert cache.get((1,)) is None


# --------------------------------------------------------------- model tier: padding per batch
def mixed_lengths(scorer) -> list[EncodedItem]:  # type: ignore[no-untyped-def]
    """Twelve items of twelve different problems and lengths (nothing to share)."""
    return [scorer.encode(f"Problem {n}: " + "sum the numbers " * (3 * n), "print(1)\n" * (1 + 2 * n))
            for n in range(12)]


def test_packed_batches_have_no_padding(tiny_scorer) -> None:  # type: ignore[no-untyped-def]
    items = mixed_lengths(tiny_scorer)
    assert len({i.length for i in items}) == 12
    _, stats = tiny_scorer.score_with_stats(items)
    assert stats is not None and stats.padding_ratio == 0.0 and stats.tokens == sum(i.length for i in items)


def test_padded_batches_of_mixed_lengths_stay_within_max_padding(model_cache: Path) -> None:
    from models.hf import HFScorer

    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", packed=False,
                      prefix_reuse=False)
    items = mixed_lengths(scorer)
    assert padding_ratio([i.length for i in items]) > 0.3  # one padded batch of all would waste a third
    _, stats = scorer.score_with_stats(items)
    assert stats is not None and stats.tokens == sum(i.length for i in items)
    assert 0.0 < stats.padding_ratio <= 0.05
