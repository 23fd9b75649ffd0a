"""Shared-prefix bookkeeping: which items share a problem, and a bounded cache of problem key/values.

All rollouts of a GRPO prompt (and all best-of-N candidates) start with the same
tokens: the chat template around the same problem. Their key/value states for
those tokens are identical, so the model computes them once per group. Items of
one group often reach the model in different batches (single-sample requests
trickle in), so the states of recent problems are kept in a cache bounded in
bytes. Pure bookkeeping: the tensors it stores are opaque here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.base import EncodedItem

#: The tokens of an item that depend on its problem only (``input_ids[:prefix_len]``):
#: items with equal keys answer the same problem and can share one prefix.
ProblemKey = tuple[int, ...]


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


def problem_key(item: EncodedItem) -> ProblemKey | None:
    """The tokens that depend on the problem only; None when the item has no such part."""
    return item.input_ids[: item.prefix_len] if item.prefix_len > 0 else None


def group_by_problem(items: Sequence[EncodedItem]) -> list[tuple[ProblemKey | None, list[int]]]:
    """Item indices grouped by problem key, in order of first appearance; keyless items alone."""
    groups: list[tuple[ProblemKey | None, list[int]]] = []
    where: dict[ProblemKey, int] = {}
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
    """Key/value states of ``tokens`` as the runner stored them, and their size in bytes."""

    tokens: tuple[int, ...]
    states: Any
    nbytes: int


class PrefixCache:
    """Problem prefix states kept between batches: a segmented LRU of at most ``max_bytes`` bytes.

    Bounded in bytes because that is what it takes from the device (a prefix of n tokens
    holds layers x 2 x kv_heads x head_dim x n values). Two segments: a new prefix enters
    *probation*; one used again moves to *protected* (at most ``protected_share`` of the
    bytes). Eviction takes the least recently used prefix of probation first, so a stream
    of one-off problems cycles through probation and never evicts the problems of GRPO
    groups still arriving, while the first rollout of a group still leaves its prefix for
    the next ones. 0 bytes disables the cache. Only the model thread mutates it;
    ``__contains__`` may be asked from elsewhere (the batcher's cost estimate).
    """

    def __init__(self, max_bytes: int, protected_share: float = 0.8) -> None:
        self.max_bytes = max_bytes
        self.protected_share = protected_share
        self.bytes = 0  # both segments
        self.hits = 0
        self._protected_used = 0
        self._probation: OrderedDict[ProblemKey, CachedPrefix] = OrderedDict()
        self._protected: OrderedDict[ProblemKey, CachedPrefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def __contains__(self, key: object) -> bool:
        return key in self._protected or key in self._probation

    def get(self, key: ProblemKey) -> CachedPrefix | None:
        """The entry stored for ``key``, now the most recently used of the protected segment."""
        entry = self._protected.get(key)
        if entry is not None:
            self._protected.move_to_end(key)
        else:
            entry = self._probation.pop(key, None)
            if entry is None:
                return None
            self._protected[key] = entry
            self._protected_used += entry.nbytes
            while self._protected_used > self.max_bytes * self.protected_share and len(self._protected) > 1:
                old_key, old = self._protected.popitem(last=False)  # demoted, not evicted
                self._protected_used -= old.nbytes
                self._probation[old_key] = old
        self.hits += 1
        return entry

    def put(self, key: ProblemKey, entry: CachedPrefix) -> None:
        """Store ``entry`` in probation, evicting beyond the byte bound (too large: not stored)."""
        if entry.nbytes > self.max_bytes:
            return
        for segment in (self._probation, self._protected):
            old = segment.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
                self._protected_used -= old.nbytes if segment is self._protected else 0
        self._probation[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:  # the new entry goes last: it must serve the next rollouts
            if len(self._probation) > 1 or not self._protected:
                _, evicted = self._probation.popitem(last=False)
            else:
                _, evicted = self._protected.popitem(last=False)
                self._protected_used -= evicted.nbytes
            self.bytes -= evicted.nbytes

    def clear(self) -> None:
        """Forget every entry (after warm-up, or when memory is short)."""
        self._probation.clear()
        self._protected.clear()
        self.bytes = self._protected_used = 0
