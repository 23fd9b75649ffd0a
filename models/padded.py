"""Padded scoring: the runner for every attention implementation (eager, sdpa on CUDA, ...).

Used where packed scoring (models/varlen.py) is not available. Whole sequences run
as right-padded, length-sorted chunks with at most ``max_padding`` padding; with
prefix reuse on, the items of a batch that share a problem run their common prefix
once and their suffixes as padded chunks over copies of the prefix's key/value cache.

No padding mask is passed: with right padding and causal attention a real token
never attends to a pad (pads come after it), so the scores are exactly those of
a masked forward, and the attention kernels keep their fast causal path.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from models.base import BatchStats, EncodedItem
from models.cost import PaddedCost
from models.packing import pack_by_length
from models.prefix import group_by_problem, shared_len


class PaddedRunner:
    """Scores batches as padded chunks, sharing prefixes through the transformers cache."""

    def __init__(self, model: Any, device: torch.device, pad_token_id: int, *, max_tokens: int,
                 max_items: int, max_padding: float, prefix_reuse: bool) -> None:
        self.model = model
        self.device = device
        self.pad_token_id = pad_token_id
        self.max_tokens = max_tokens
        self.max_items = max_items
        self.max_padding = max_padding
        self.prefix_reuse = prefix_reuse
        params = inspect.signature(model.base_model.forward).parameters
        # transformers 5 renamed past_key_values to cache; accept either release line.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._work = [0, 0]

    def batch_cost(self) -> PaddedCost:
        """The batcher's cost of a batch: whole sequences padded to the longest (an upper bound of
        the chunks this runner makes, and of a shared prefix run once plus its per-item copies)."""
        return PaddedCost()

    def run(self, items: Sequence[EncodedItem]) -> tuple[list[float], BatchStats]:
        """Raw logits in input order, and the real and padded tokens computed."""
        results: list[float | None] = [None] * len(items)
        self._work = [0, 0]
        singles: list[int] = []
        groups = group_by_problem(items) if self.prefix_reuse else [(None, [i]) for i in range(len(items))]
        for key, group in groups:
            if key is not None and len(group) > 1 and shared_len(items, group) > 0:
                self._score_shared(items, group, results)
            else:
                singles.extend(group)
        self._score_plain(items, singles, results)
        assert all(r is not None for r in results)
        stats = BatchStats(tokens=self._work[0], padded_tokens=self._work[1])
        return [float(r) for r in results], stats  # type: ignore[arg-type]

    def _pad(self, rows: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and each row's last real position."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        last = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
        self._work[0] += sum(len(r) for r in rows)
        self._work[1] += ids.numel()
        return ids.to(self.device), last.to(self.device)

    def _head(self, hidden: torch.Tensor, last: torch.Tensor) -> list[float]:
        """The classifier head on each row's last real token (what the HF forward pools)."""
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.model.score(pooled.float())[:, 0].tolist()

    def _score_plain(self, items: Sequence[EncodedItem], indices: list[int], results: list[float | None]) -> None:
        """Whole sequences, length-sorted into padded batches with little padding."""
        lengths = [items[i].length for i in indices]
        for chunk in pack_by_length(lengths, self.max_tokens, self.max_items, self.max_padding):
            ids, last = self._pad([items[indices[c]].input_ids for c in chunk])
            hidden = self.model.base_model(input_ids=ids).last_hidden_state
            for c, value in zip(chunk, self._head(hidden, last), strict=True):
                results[indices[c]] = value

    def _score_shared(self, items: Sequence[EncodedItem], group: list[int], results: list[float | None]) -> None:
        """The group's common prefix once, then its suffixes over copies of the prefix cache."""
        sequences = [items[i].input_ids for i in group]
        shared = shared_len(items, group)
        prefix = torch.tensor([sequences[0][:shared]], dtype=torch.long, device=self.device)
        self._work[0] += shared
        self._work[1] += shared
        out = self.model.base_model(input_ids=prefix, use_cache=True)
        cache = getattr(out, self._cache_kwarg)
        suffix_lengths = [len(s) - shared for s in sequences]
        budget = max(self.max_tokens - shared, 1)
        for chunk in pack_by_length(suffix_lengths, budget, self.max_items, self.max_padding):
            ids, last = self._pad([sequences[c][shared:] for c in chunk])
            batch_cache = copy.deepcopy(cache)
            if len(chunk) > 1:
                batch_cache.batch_repeat_interleave(len(chunk))
            positions = torch.arange(shared, shared + ids.shape[1], device=self.device).expand(len(chunk), -1)
            hidden = self.model.base_model(
                input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_kwarg: batch_cache},
            ).last_hidden_state
            for c, value in zip(chunk, self._head(hidden, last), strict=True):
                results[group[c]] = value
