"""Padding-free scoring: sequences packed side by side in one row, shared prefixes run once.

Why: on a CPU a padded batch is no faster per token than one sequence at a time
(the matrix products are already efficient at a few hundred rows), and an
attention mask moves PyTorch off its fused causal kernel; on a GPU padding is
wasted work. Packing keeps the big matrix products (they see every token of the
chunk as one row of ``[tokens, hidden]``) and gives attention exactly the pairs
it needs, segment by segment, with no padding and no masks.

Two passes per batch:
1. Prefixes (each problem shared by a group, unless its key/values are cached)
   and items without a shared prefix, each a causal segment starting at
   position 0. The key/value states of the prefixes are captured.
2. The rest of each item (its suffix), positioned after its prefix, attending to
   the prefix's states and causally to itself.

Attention for a suffix is split exactly in two (cascade attention): all queries
of a group against the prefix keys (no mask; one call per group, queries of
the group folded together), and each suffix causally against its own keys; the
two softmax parts are merged with their log-sum-exp. On CUDA with flash-attn,
flash_attn_varlen_func does the same in one call per layer (its causal mask is
aligned bottom-right, so a suffix sees its whole prefix).

The attention function is registered with transformers under its own name and
delegates to the base implementation when called without a packed pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.base import BatchStats, EncodedItem
from models.packing import chunk_by_tokens
from models.prefix import (
    CachedPrefix,
    PrefixCache,
    common_prefix_len,
    group_by_problem,
    shared_len,
)

#: Per layer, the (key, value) states of a prefix, each ``[kv_heads, tokens, head_dim]``.
States = list[tuple[torch.Tensor, torch.Tensor]]
#: A prefix computed by this batch: (problem key, its slot in the states, its tokens).
_New = tuple[tuple[int, ...], int, tuple[int, ...]]


def supported(model: Any, device: torch.device, attn_implementation: str) -> bool:
    """Whether packed scoring applies: CPU with sdpa, or flash_attention_2, and full attention only."""
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in layer_types):
        return False  # sliding-window layers would need their window applied per segment
    if attn_implementation == "flash_attention_2":
        return True
    return attn_implementation == "sdpa" and device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )


@dataclass(slots=True)
class Segment:
    """Tokens run as one causal sequence inside a packed row."""

    tokens: Sequence[int]
    position: int  # position id of the first token: 0, or the length of its prefix
    item: int | None = None  # the item whose score is read at the last token
    prefix: int | None = None  # index of the prefix states this segment continues
    capture: int | None = None  # index under which this segment's states are kept


@dataclass(slots=True)
class PackedPass:
    """What the attention function needs to know about one packed forward."""

    bounds: list[tuple[int, int]]
    prefixes: list[int | None]
    states: list[States | None]
    capture: dict[int, States] = field(default_factory=dict)


def _cpu_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU attention, which also returns the log-sum-exp needed for the merge."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _cpu_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, p: PackedPass, layer: int,
                scale: float | None) -> torch.Tensor:
    """Cascade attention over the segments of ``p`` with the fused CPU kernel; returns [1, T, H, D]."""
    _, heads, total, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query[0].view(kv_heads, groups, total, dim)  # head h uses kv head h // groups, as repeat_kv does
    k, v = key[0], value[0]
    out = query.new_empty(kv_heads, groups, total, dim)
    lse = query.new_empty(kv_heads, groups, total, dtype=torch.float32)
    n, first = len(p.bounds), 0
    while first < n:  # a run: consecutive segments continuing the same prefix (or one segment without)
        prefix = p.prefixes[first]
        last = first
        while prefix is not None and last + 1 < n and p.prefixes[last + 1] == prefix:
            last += 1
        for m in range(first, last + 1):
            s, e = p.bounds[m]
            shape = (kv_heads, groups, e - s, dim)
            own, own_lse = _cpu_attend(q[:, :, s:e], k[:, None, s:e].expand(shape), v[:, None, s:e].expand(shape),
                                       True, scale)
            out[:, :, s:e] = own
            lse[:, :, s:e] = own_lse
            if m in p.capture:
                p.capture[m].append((k[:, s:e].clone(), v[:, s:e].clone()))
        start, end = p.bounds[first][0], p.bounds[last][1]
        if prefix is not None:  # every query of the run against the shared prefix, folded into one call
            states = p.states[prefix]
            assert states is not None
            pk, pv = states[layer]
            folded = q[:, :, start:end].reshape(kv_heads, 1, groups * (end - start), dim)
            pre_out, pre_lse = _cpu_attend(folded, pk.unsqueeze(1), pv.unsqueeze(1), False, scale)
            pre_out = pre_out.reshape(kv_heads, groups, end - start, dim)
            # softmax over [prefix; own] = the two partial softmaxes mixed by their log-sum-exps.
            weight = torch.sigmoid(lse[:, :, start:end] - pre_lse.reshape(kv_heads, groups, end - start))
            mixed = out[:, :, start:end]
            mixed.sub_(pre_out).mul_(weight.unsqueeze(-1).to(mixed.dtype)).add_(pre_out)
        first = last + 1
    return out.view(heads, total, dim).transpose(0, 1).unsqueeze(0)


def _flash_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, p: PackedPass, layer: int,
                  scale: float | None) -> torch.Tensor:
    """The same attention with flash_attn_varlen_func (CUDA); returns [1, T, H, D].

    Each segment is one varlen sequence; one that continues a prefix gets the prefix's
    keys in front of its own. flash-attn >= 2.1 aligns the causal mask bottom-right,
    so query i of a suffix sees the whole prefix and its own keys up to i.
    """
    from flash_attn import flash_attn_varlen_func

    q = query[0].transpose(0, 1).contiguous()  # [T, H, D]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, KV, D]
    keys, values, q_lens, k_lens = [], [], [], []
    for m, (s, e) in enumerate(p.bounds):
        prefix = p.prefixes[m]
        if prefix is None:
            keys.append(k[s:e])
            values.append(v[s:e])
        else:
            states = p.states[prefix]
            assert states is not None
            pk, pv = states[layer]
            keys.append(torch.cat([pk.transpose(0, 1), k[s:e]]))
            values.append(torch.cat([pv.transpose(0, 1), v[s:e]]))
        q_lens.append(e - s)
        k_lens.append(keys[-1].shape[0])
        if m in p.capture:
            p.capture[m].append((key[0, :, s:e].clone(), value[0, :, s:e].clone()))
    cu_q = torch.tensor([0, *q_lens], device=q.device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *k_lens], device=q.device).cumsum(0).to(torch.int32)
    out = flash_attn_varlen_func(q, torch.cat(keys), torch.cat(values), cu_q, cu_k, max(q_lens), max(k_lens),
                                 softmax_scale=scale, causal=True)
    return out.unsqueeze(0)


def install(model: Any, base: str) -> str:
    """Register the packed attention for ``base`` (sdpa or flash_attention_2) and switch ``model`` to it."""
    name = f"codescaler_packed_{base}"
    delegate = ALL_ATTENTION_FUNCTIONS[base]
    packed = _flash_packed if base == "flash_attention_2" else _cpu_packed

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None,
                  codescaler_pass: PackedPass | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if codescaler_pass is None:  # an ordinary forward: the base implementation, unchanged
            return delegate(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return packed(query, key, value, codescaler_pass, module.layer_idx, scaling), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = name
    return name


class PackedRunner:
    """Scores batches in packed forwards; shares and caches problem prefixes when asked to."""

    def __init__(self, model: Any, device: torch.device, *, max_tokens: int, prefix_reuse: bool,
                 cache_tokens: int) -> None:
        self.model = model
        self.device = device
        self.max_tokens = max_tokens
        self.prefix_reuse = prefix_reuse
        self.cache = PrefixCache(cache_tokens)
        self._no_masks = {t: None for t in (getattr(model.config, "layer_types", None) or ["full_attention"])}

    def run(self, items: Sequence[EncodedItem]) -> tuple[list[float], BatchStats]:
        """Raw logits in input order and the tokens computed (no padding: both counts equal)."""
        first_pass, second_pass, states, to_cache = self._plan(items)
        results: list[float | None] = [None] * len(items)
        tokens = self._run_pass(first_pass, states, results)
        tokens += self._run_pass(second_pass, states, results)
        for key, slot, prefix in to_cache:
            captured = states[slot]
            assert captured is not None
            self.cache.put(key, CachedPrefix(prefix, captured))
        assert all(r is not None for r in results)
        return [float(r) for r in results], BatchStats(tokens=tokens, padded_tokens=tokens)  # type: ignore[arg-type]

    def _plan(self, items: Sequence[EncodedItem]) -> tuple[list[Segment], list[Segment], list[States | None], list[_New]]:
        """Split items into prefix segments (pass 1) and suffix segments (pass 2).

        ``states`` gets one slot per prefix used by this batch: filled from the cache now,
        or by pass 1 (those slots are listed in the returned prefixes to cache).
        """
        first: list[Segment] = []
        second: list[Segment] = []
        states: list[States | None] = []
        to_cache: list[_New] = []
        groups = group_by_problem(items) if self.prefix_reuse else [(None, [i]) for i in range(len(items))]
        for key, group in groups:
            shared = shared_len(items, group) if key is not None else 0
            if shared == 0 or (len(group) == 1 and self.cache.max_tokens == 0):
                first.extend(Segment(items[i].input_ids, 0, item=i) for i in group)
                continue
            lead = items[group[0]].input_ids
            cached = self.cache.get(key)
            if cached is not None:
                shared = common_prefix_len([cached.tokens, lead[:shared]])
                states.append([(pk[:, :shared], pv[:, :shared]) for pk, pv in cached.states])
            else:
                first.append(Segment(lead[:shared], 0, capture=len(states)))
                to_cache.append((key, len(states), tuple(lead[:shared])))
                states.append(None)
            slot = len(states) - 1
            second.extend(Segment(items[i].input_ids[shared:], shared, item=i, prefix=slot) for i in group)
        return first, second, states, to_cache

    def _run_pass(self, segments: list[Segment], states: list[States | None], results: list[float | None]) -> int:
        """Run ``segments`` in chunks of at most max_tokens tokens; fill results and captured states."""
        tokens = 0
        for chunk in chunk_by_tokens([len(s.tokens) for s in segments], self.max_tokens):
            part = [segments[c] for c in chunk]
            hidden, captured = self._forward(part, states)
            tokens += sum(len(s.tokens) for s in part)
            for local, layers in captured.items():
                slot = part[local].capture
                assert slot is not None
                states[slot] = layers
            scored = [i for i, s in enumerate(part) if s.item is not None]
            if scored:
                index = torch.tensor(scored, device=hidden.device)
                logits = self.model.score(hidden[index])[:, 0].float().tolist()
                for i, value in zip(scored, logits, strict=True):
                    results[part[i].item] = value  # type: ignore[index]
        return tokens

    def _forward(self, part: list[Segment], states: list[States | None]) -> tuple[torch.Tensor, dict[int, States]]:
        """One packed forward: hidden state at each segment's last token, and the captured states."""
        ids = torch.tensor(list(chain.from_iterable(s.tokens for s in part)), dtype=torch.long)
        positions = torch.tensor(list(chain.from_iterable(range(s.position, s.position + len(s.tokens))
                                                          for s in part)), dtype=torch.long)
        bounds, start = [], 0
        for s in part:
            bounds.append((start, start + len(s.tokens)))
            start += len(s.tokens)
        packed = PackedPass(bounds, [s.prefix for s in part], states,
                            {i: [] for i, s in enumerate(part) if s.capture is not None})
        hidden = self.model.base_model(
            input_ids=ids.unsqueeze(0).to(self.device), position_ids=positions.unsqueeze(0).to(self.device),
            attention_mask=self._no_masks, use_cache=False, codescaler_pass=packed,
        ).last_hidden_state[0]
        last = torch.tensor([e - 1 for _, e in bounds], device=hidden.device)
        return hidden[last], packed.capture

