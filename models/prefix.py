"""Shared-prefix bookkeeping: which items share a problem, and a bounded cache of problem key/values.

All rollouts of a GRPO prompt (and all best-of-N candidates) start with the same
tokens: the chat template around the same problem. Their key/value states for
those tokens are identical, so the model computes them once per group. Items of
one group often reach the model in different batches (single-sample requests
trickle in), so the states of recent problems are kept in a small LRU cache
bounded in tokens. Pure bookkeeping: the tensors it stores are opaque here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.base import EncodedItem


def common_prefix_len(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix that all sequences share (0 for no sequences)."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return n


def problem_key(item: EncodedItem) -> tuple[int, ...] | None:
    """The tokens that depend on the problem only; None when the item has no such part."""
    return item.input_ids[: item.prefix_len] if item.prefix_len > 0 else None


def group_by_problem(items: Sequence[EncodedItem]) -> list[tuple[tuple[int, ...] | None, list[int]]]:
    """Item indices grouped by problem key, in order of first appearance; keyless items alone."""
    groups: list[tuple[tuple[int, ...] | None, list[int]]] = []
    where: dict[tuple[int, ...], int] = {}
    for i, item in enumerate(items):
        key = problem_key(item)
        at = where.get(key) if key is not None else None
        if at is not None:
            groups[at][1].append(i)
            continue
        if key is not None:
            where[key] = len(groups)
        groups.append((key, [i]))
    return groups


def shared_len(items: Sequence[EncodedItem], group: Sequence[int]) -> int:
    """Tokens that every item of ``group`` shares and that can run once for all of them.

    For several items: their longest common prefix (the problem plus the fixed start of
    the assistant turn). For one item: its problem part, so that later items of the same
    problem can reuse it from the cache. Every item keeps at least one token of its own,
    because its score is read at its last token.
    """
    sequences = [items[i].input_ids for i in group]
    shared = common_prefix_len(sequences) if len(sequences) > 1 else items[group[0]].prefix_len
    return max(0, min(shared, min(len(s) for s in sequences) - 1))


@dataclass(slots=True)
class CachedPrefix:
    """Key/value states of ``tokens`` as the runner stored them (one entry per layer)."""

    tokens: tuple[int, ...]
    states: Any


class PrefixCache:
    """Least-recently-used problem states, at most ``max_tokens`` tokens in all (0 disables it).

    The bound is in tokens because the memory of one entry is proportional to its
    length (layers x 2 x kv_heads x head_dim x bytes per token).
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = 0
        self._entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[int, ...]) -> CachedPrefix | None:
        """The entry stored for ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def put(self, key: tuple[int, ...], entry: CachedPrefix) -> None:
        """Store ``entry``, evicting the least recently used ones beyond the token bound."""
        if len(entry.tokens) > self.max_tokens:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.tokens -= len(old.tokens)
        self._entries[key] = entry
        self.tokens += len(entry.tokens)
        while self.tokens > self.max_tokens:
            _, evicted = self._entries.popitem(last=False)
            self.tokens -= len(evicted.tokens)

    def clear(self) -> None:
        """Forget every entry (after warm-up, or when memory is short)."""
        self._entries.clear()
        self.tokens = 0
