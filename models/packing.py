"""Packing: split items into forward passes with little (padded) or no (packed) padding.

A padded batch costs ``items * longest`` token-forwards. Sorting by length and
cutting a chunk whenever the token budget or the padding allowance would be
exceeded keeps that cost close to the real token count (packed forwards, which
have no padding, are planned by models/plan.py). Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence


def padded_cost(lengths: Sequence[int]) -> int:
    """Token-forwards of one right-padded batch of these lengths."""
    return len(lengths) * max(lengths, default=0)


def padding_ratio(lengths: Sequence[int]) -> float:
    """Share of a padded batch that is padding (0.0 = none)."""
    cost = padded_cost(lengths)
    return 0.0 if cost == 0 else 1.0 - sum(lengths) / cost


def pack_by_length(
    lengths: Sequence[int], max_tokens: int, max_items: int, max_padding: float = 0.05
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into chunks, shortest first.

    Each chunk has at most ``max_items`` items, a padded cost of at most
    ``max_tokens`` (a single item longer than that still gets a chunk of its own),
    and a padding ratio of at most ``max_padding`` (0..1; 1.0 disables the check).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index in order:
        length = lengths[index]
        # Sorted ascending, so the new item is the longest of the candidate chunk.
        cost = (len(current) + 1) * length
        fits = (
            len(current) < max_items
            and cost <= max_tokens
            and 1.0 - (total + length) / cost <= max_padding
        )
        if current and not fits:
            chunks.append(current)
            current, total = [], 0
        current.append(index)
        total += length
    if current:
        chunks.append(current)
    return chunks
