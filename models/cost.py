"""What a candidate batch costs the model, as the scorer counts it (pure Python, no torch).

The batcher fills ``max_batch_tokens`` by this cost, so a batch is as large as the
runner can really run: a padded forward costs ``items x longest``; a packed forward
with shared prefixes costs each uncached problem prefix once plus every item's own
tokens. 16 rollouts of a 3,000-token problem with 500-token answers cost
3,000 + 16 x 500 = 11,000 tokens packed, against 16 x 3,500 = 56,000 padded.
"""

from __future__ import annotations

from collections.abc import Callable

from models.base import EncodedItem


class BatchCost:
    """Running cost of a batch being assembled: ``cost_with`` asks, ``add`` commits."""

    def cost_with(self, item: EncodedItem) -> int:
        """The batch's cost if ``item`` were added."""
        raise NotImplementedError

    def add(self, item: EncodedItem) -> None:
        """Add ``item`` to the batch."""
        raise NotImplementedError


class PaddedCost(BatchCost):
    """Right-padded batches: every item costs as much as the longest one."""

    def __init__(self) -> None:
        self.items = 0
        self.longest = 0

    def cost_with(self, item: EncodedItem) -> int:
        return (self.items + 1) * max(self.longest, item.length)

    def add(self, item: EncodedItem) -> None:
        self.items += 1
        self.longest = max(self.longest, item.length)


class PackedCost(BatchCost):
    """Packed batches: a problem prefix once per batch (none when cached), then each item's own tokens.

    ``cached`` tells whether a problem's prefix states are already kept (read when an
    item of a new problem arrives); with ``reuse`` off every item costs its length.
    """

    def __init__(self, reuse: bool, cached: Callable[[tuple[int, ...]], bool]) -> None:
        self.reuse = reuse
        self.cached = cached
        self.total = 0
        self._problems: set[tuple[int, ...]] = set()

    def _increment(self, item: EncodedItem) -> tuple[int, tuple[int, ...] | None]:
        if not self.reuse or item.prefix_len == 0 or item.prefix_len >= item.length:
            return item.length, None
        key = item.input_ids[: item.prefix_len]
        own = item.length - item.prefix_len
        if key in self._problems or self.cached(key):
            return own, key
        return item.length, key

    def cost_with(self, item: EncodedItem) -> int:
        return self.total + self._increment(item)[0]

    def add(self, item: EncodedItem) -> None:
        tokens, key = self._increment(item)
        self.total += tokens
        if key is not None:
            self._problems.add(key)
