"""The packed plan and the batch cost as tables (pure Python, no torch): what runs where, what it costs.

Items are built from readable token tuples: problem tokens ``P`` (the key), then
each item's own tokens.
"""

from __future__ import annotations

import pytest

from models.base import EncodedItem
from models.cost import PackedCost, PaddedCost
from models.plan import plan_batch


def rollout(problem: int, prefix: int, own: int, tag: int = 0) -> EncodedItem:
    """An item of ``prefix`` problem tokens (all equal to ``problem``) and ``own`` tokens of its own."""
    return EncodedItem((problem,) * prefix + tuple(1000 + tag * 100 + k for k in range(own)), prefix)


def never(key: tuple[int, ...]) -> None:
    return None


def test_sixteen_rollouts_of_a_long_problem_cost_one_prefix_and_fit_one_forward() -> None:
    """The issue's example: 3,000 + 16 x 500 = 11,000 <= 16,384, against 56,000 padded."""
    items = [rollout(7, 3000, 500, tag) for tag in range(16)]
    packed, padded = PackedCost(True, lambda key: False), PaddedCost()
    for item in items:
        packed.add(item)
        padded.add(item)
    assert packed.total == 3000 + 16 * 500
    assert padded.cost_with(items[0]) == 17 * 3500
    plans = plan_batch(items, reuse=True, chunk_tokens=16384, keep_single=True, stored=never)
    assert len(plans) == 1 and plans[0].tokens == 11000


def test_a_cached_prefix_costs_nothing_and_reuse_off_costs_every_token() -> None:
    items = [rollout(7, 3000, 500, tag) for tag in range(4)]
    cached = PackedCost(True, lambda key: key == (7,) * 3000)
    off = PackedCost(False, lambda key: True)
    for item in items:
        cached.add(item)
        off.add(item)
    assert cached.total == 4 * 500 and off.total == 4 * 3500


def test_the_row_holds_prefixes_then_lone_items_then_suffixes_in_group_order() -> None:
    a = [rollout(1, 5, 3, tag) for tag in range(2)]
    lone = EncodedItem((9, 9, 9, 9), 0)
    b = [rollout(2, 4, 2, tag) for tag in range(3)]
    items = [a[0], b[0], lone, a[1], b[1], b[2]]
    (plan,) = plan_batch(items, reuse=True, chunk_tokens=1000, keep_single=True, stored=never)
    layout = [(len(s.tokens), s.position, s.item) for s in plan.segments]
    assert layout == [(5, 0, None), (4, 0, None), (4, 0, 2), (3, 5, 0), (3, 5, 3), (2, 4, 1), (2, 4, 4), (2, 4, 5)]
    assert plan.captures == [((1,) * 5, 0, 5), ((2,) * 4, 5, 9)]
    row = plan.row_prefixes
    assert row is not None and (row.q_start, row.q_end, row.q_lens, row.k_lens) == (13, 25, [6, 6], [5, 4])
    assert plan.stored_prefixes is None


def test_stored_prefixes_are_read_not_run() -> None:
    items = [rollout(1, 5, 3, tag) for tag in range(2)] + [rollout(2, 4, 2)]
    (plan,) = plan_batch(items, reuse=True, chunk_tokens=1000, keep_single=True,
                         stored=lambda key: key if key == (1,) * 5 else None)
    assert plan.tokens == 3 + 3 + 4 + 2  # problem 1 came from the cache, problem 2 (alone) runs whole
    stored = plan.stored_prefixes
    assert stored is not None and stored.keys == [(1,) * 5] and stored.k_lens == [5] and stored.q_lens == [6]
    assert [(len(s.tokens), s.position, s.item) for s in plan.segments] == [(6, 0, 2), (3, 5, 0), (3, 5, 1)]
    assert plan.captures == [((2,) * 4, 0, 4)]  # kept from the first tokens of the item run whole


def test_the_only_item_of_a_new_problem_runs_whole_and_its_prefix_is_kept_from_inside_it() -> None:
    a = [rollout(1, 5, 3, tag) for tag in range(2)]
    single = rollout(2, 4, 2)
    (plan,) = plan_batch([a[0], single, a[1]], reuse=True, chunk_tokens=1000, keep_single=True, stored=never)
    layout = [(len(s.tokens), s.position, s.item) for s in plan.segments]
    assert layout == [(5, 0, None), (6, 0, 1), (3, 5, 0), (3, 5, 2)]  # no split, no prefix attention for it
    assert plan.captures == [((1,) * 5, 0, 5), ((2,) * 4, 5, 9)]
    row = plan.row_prefixes
    assert row is not None and (row.q_start, row.q_end, row.q_lens, row.k_lens) == (11, 17, [6], [5])
    (alone,) = plan_batch([single], reuse=True, chunk_tokens=1000, keep_single=True,
                          stored=lambda key: (2,) * 4)  # stored already: read, not run
    assert plan.tokens == 17 and alone.tokens == 2 and not alone.captures


def test_a_group_split_across_forwards_runs_its_prefix_once() -> None:
    items = [rollout(1, 50, 30, tag) for tag in range(5)]
    plans = plan_batch(items, reuse=True, chunk_tokens=100, keep_single=True, stored=never)
    assert [p.tokens for p in plans] == [50 + 30, 3 * 30, 30]
    assert plans[0].row_prefixes is not None and plans[0].captures
    for later in plans[1:]:  # from the states the first forward captured
        assert later.row_prefixes is None and not later.captures
        assert later.stored_prefixes is not None and later.stored_prefixes.keys == [(1,) * 50]
    assert sorted(s.item for p in plans for s in p.segments if s.item is not None) == list(range(5))


def test_without_reuse_or_a_cache_every_item_runs_whole() -> None:
    items = [rollout(1, 5, 3, tag) for tag in range(3)]
    (plan,) = plan_batch(items, reuse=False, chunk_tokens=1000, keep_single=True, stored=never)
    assert [(len(s.tokens), s.position, s.item) for s in plan.segments] == [(8, 0, 0), (8, 0, 1), (8, 0, 2)]
    (single,) = plan_batch(items[:1], reuse=True, chunk_tokens=1000, keep_single=False, stored=never)
    assert [(len(s.tokens), s.item) for s in single.segments] == [(8, 0)] and not single.captures


@pytest.mark.parametrize("chunk", [1, 7, 13, 40, 1000])
def test_every_item_is_scored_once_whatever_the_chunk(chunk: int) -> None:
    items = [rollout(p, 4 + p, 2 + (t % 3), t) for p in range(4) for t in range(p + 1)] + [EncodedItem((5,) * 9, 0)]
    plans = plan_batch(items, reuse=True, chunk_tokens=chunk, keep_single=True, stored=never)
    scored = [s.item for p in plans for s in p.segments if s.item is not None]
    assert sorted(scored) == list(range(len(items)))
    # Over the budget only when one prefix and its first suffix alone do not fit.
    assert all(p.tokens <= chunk or len(p.segments) <= 2 for p in plans)
