"""What the CUDA path's layers are given, seen through a recording kernel on the CPU (tiny model).

The reference kernel stands in for torch's varlen_attn; a wrapper records every call,
so the claims about the packed forward are checked where they are made:
- the offsets of every call were uploaded before the layers ran (none built per layer);
- three calls per layer at most (own, row prefixes, stored prefixes), one forward per batch;
- the prefix keys a group's suffixes read are the prefix once, not one copy per suffix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import attention
from models.attention import Seqs
from models.base import EncodedItem
from models.hf import HFScorer


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    recorded: list[dict[str, object]] = []

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Seqs, causal: bool,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        recorded.append({"uploaded": seqs.cu is not None, "causal": causal, "q": q.shape[0], "k": k.shape[0],
                         "sequences": len(seqs.q_bounds)})
        return attention.reference(q, k, v, seqs, causal, scale)

    monkeypatch.setitem(attention.KERNELS, "reference", recording)
    return recorded


def test_the_layers_get_prepared_offsets_and_the_prefix_once(model_cache: Path,
                                                              calls: list[dict[str, object]]) -> None:
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", kernel="reference",
                      chunk_tokens=16384, prefix_cache_bytes=1 << 24)
    layers = scorer.model.config.num_hidden_layers
    problem = "Reverse a list. " + " ".join(f"w{k}" for k in range(60))
    group = [scorer.encode(problem, f"print(list(reversed(xs))[{k}:])") for k in range(8)]
    lone = EncodedItem(scorer.encode("Print one.", "print(1)").input_ids, 0)  # no problem key: runs whole
    calls.clear()
    scorer.score([*group, lone])
    assert all(c["uploaded"] for c in calls)
    assert len(calls) == 2 * layers  # one forward: own + the row's prefix per layer
    own = [c for c in calls if c["causal"]]
    pre = [c for c in calls if not c["causal"]]
    assert len(own) == len(pre) == layers
    # The row holds the shared prefix once, the eight suffixes and the lone item:
    # row = sum(lengths) - 7 * prefix + lone, so the prefix length follows from the row.
    row = own[0]["q"]
    prefix, remainder = divmod(sum(i.length for i in group) + lone.length - row, 7)  # type: ignore[operator]
    assert remainder == 0 and 0 < prefix < group[0].length
    for c in pre:  # the suffixes of the group (one sequence) against the prefix once
        assert (c["k"], c["q"], c["sequences"]) == (prefix, sum(i.length - prefix for i in group), 1)
    calls.clear()
    scorer.score(group)  # the same problem again: its prefix is stored, the row holds only suffixes
    assert all(c["uploaded"] for c in calls) and len(calls) == 2 * layers
    stored = [c for c in calls if not c["causal"]]
    assert [(c["k"], c["sequences"]) for c in stored] == [(prefix, 1)] * layers
    suffixes = sum(i.length - prefix for i in group)
    assert all(c["q"] == suffixes for c in calls if c["causal"])  # no prefix token in the row


def test_stored_prefixes_are_read_in_place_or_gathered_one_layer_at_a_time(model_cache: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One stored prefix: its cached states are the keys (a view). Several: one layer's keys at a time."""
    storages: list[tuple[int, int, int]] = []  # (keys' storage, keys, sequences) of each stored-prefix call

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Seqs, causal: bool,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not causal:
            storages.append((k.untyped_storage().data_ptr(), k.shape[0], len(seqs.q_bounds)))
        return attention.reference(q, k, v, seqs, causal, scale)

    monkeypatch.setitem(attention.KERNELS, "reference", recording)
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", kernel="reference",
                      chunk_tokens=16384, prefix_cache_bytes=1 << 24)
    layers = scorer.model.config.num_hidden_layers
    problems = [f"Problem {n}: " + " ".join(f"w{k}" for k in range(20 + 10 * n)) for n in range(3)]
    items = [scorer.encode(p, f"print({k})") for p in problems for k in range(2)]
    first = [scorer.score([item])[0] for item in items[::2]]  # each problem alone: its prefix is kept
    cache = scorer.runner.cache  # type: ignore[union-attr]
    entries = [cache.get(item.input_ids[: item.prefix_len]) for item in items[::2]]
    assert all(e is not None for e in entries)
    storages.clear()
    again = scorer.score(items[:1])  # one stored prefix: the keys are the cache's own memory
    assert again == pytest.approx(first[:1], abs=1e-5)
    assert {s for s, _, _ in storages} == {entries[0].states.untyped_storage().data_ptr()}  # type: ignore[union-attr]
    storages.clear()
    scores = scorer.score(items)  # three stored prefixes in one call per layer, gathered per layer
    assert scores[::2] == pytest.approx(first, abs=1e-5)
    prefixes = sum(item.prefix_len for item in items[::2])
    assert [(n, seqs) for _, n, seqs in storages] == [(prefixes, 3)] * layers
    cached = {e.states.untyped_storage().data_ptr() for e in entries}  # type: ignore[union-attr]
    assert not cached & {s for s, _, _ in storages}  # a gathered copy, of one layer: [tokens, kv, dim]
