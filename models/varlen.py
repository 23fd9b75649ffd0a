"""Padding-free scoring on every device: packed rows, shared prefixes run once, cascade attention.

Why: padding is wasted work on a GPU, and on a CPU an attention mask moves PyTorch
off its fused kernel. Packing keeps the big matrix products (they see every token of
the forward as one row of ``[tokens, hidden]``) and gives attention exactly the pairs
it needs. models/plan.py decides, in plain Python, which tokens run in which forward;
this module turns one plan into tensors and runs it.

Attention of a layer is the cascade, the same code on every device; only the kernel
behind the varlen contract (models/attention.py) differs: torch's varlen_attn on
CUDA, the fused CPU kernel per sequence here, the float32 reference in the tests.
1. every segment causally against itself (one call);
2. suffix queries against the prefix computed in the same row (a slice of the row's
   keys, no copy) and against stored prefix states (one call each; several stored
   prefixes are gathered one layer at a time, so the copy holds one layer's keys and
   values, never the whole model's);
3. the parts merged by their log-sum-exps: softmax over [prefix; own] keys equals
   ``own_out + sigmoid(prefix_lse - own_lse) * (prefix_out - own_out)``, one in-place lerp.
Everything a layer needs (offsets, positions, gather indices) is uploaded once per
forward in one host-to-device copy; nothing inside the layers syncs with the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.attention import Kernel, Seqs
from models.base import BatchStats, EncodedItem
from models.cost import PackedCost
from models.plan import ForwardPlan, PrefixCall, plan_batch
from models.prefix import CachedPrefix, PrefixCache, ProblemKey

#: Attention implementation name registered with transformers.
PACKED_NAME = "codescaler_packed"


def supported(model: Any) -> bool:
    """Whether packed scoring applies: full attention in every layer (no sliding windows)."""
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in layer_types)


@dataclass(slots=True)
class _PrefixAttention:
    """One prefix call of a forward: its queries, their sequences, and where the keys come from."""

    q_start: int
    q_end: int
    seqs: Seqs
    row_keys: int | None = None  # keys are the row's first ``row_keys`` tokens
    stored: list[torch.Tensor] | None = None  # else per group [layers, 2, tokens, kv_heads, head_dim]


@dataclass(slots=True)
class PackedPass:
    """What the attention function needs about one packed forward (made once, read by every layer)."""

    kernel: Kernel
    own: Seqs
    prefixes: list[_PrefixAttention]
    captures: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (start, end, buffer)


def cascade(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, p: PackedPass, layer: int,
            scale: float | None) -> torch.Tensor:
    """Attention of one layer of a packed forward; takes and returns transformers' layouts.

    ``query`` ``[1, H, T, D]`` and ``key``/``value`` ``[1, H_kv, T, D]``; returns ``[1, T, H, D]``.
    """
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    for start, end, buffer in p.captures:  # this layer's states of the prefixes to keep
        buffer[layer, 0].copy_(k[start:end])
        buffer[layer, 1].copy_(v[start:end])
    out, lse = p.kernel(q, k, v, p.own, True, scale)
    for part in p.prefixes:
        if part.stored is not None:
            pk, pv = _layer_states(part.stored, layer)
        else:
            pk, pv = k[: part.row_keys], v[: part.row_keys]
        s, e = part.q_start, part.q_end
        pre_out, pre_lse = p.kernel(q[s:e], pk, pv, part.seqs, False, scale)
        # own + sigmoid(pre_lse - own_lse) * (pre - own): one in-place kernel that computes in
        # float32 on CUDA for bf16 inputs (a sub/mul/add chain would round three times).
        to_prefix = torch.sigmoid(pre_lse - lse[:, s:e]).transpose(0, 1).unsqueeze(-1)  # [n, H, 1]
        out[s:e].lerp_(pre_out, to_prefix.to(out.dtype))
    return out.unsqueeze(0)


def _layer_states(parts: list[torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[tokens, kv_heads, head_dim]`` of one layer of the stored prefixes, back to back.

    One prefix is a view; several are gathered by one cat for this layer only. A cat of
    whole states before the forward would hold every layer's copy at once: 64 stored
    3,000-token problems of an 8B-shaped model are 26 GiB, one layer of them 0.7 GiB.
    """
    if len(parts) == 1:
        return parts[0][layer, 0], parts[0][layer, 1]
    both = torch.cat([p[layer] for p in parts], dim=1)  # [2, tokens, kv_heads, head_dim]
    return both[0], both[1]


def install(model: Any) -> str:
    """Register the packed attention (delegating to the model's own when not packing) and switch to it."""
    base = model.config._attn_implementation
    delegate = ALL_ATTENTION_FUNCTIONS[base]

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None,
                  codescaler_pass: PackedPass | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if codescaler_pass is None:  # an ordinary forward: the base implementation, unchanged
            return delegate(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return cascade(query, key, value, codescaler_pass, module.layer_idx, scaling), None

    AttentionInterface.register(PACKED_NAME, attention)
    AttentionMaskInterface.register(PACKED_NAME, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = PACKED_NAME
    return PACKED_NAME


def _upload(device: torch.device, *lists: Sequence[int]) -> list[torch.Tensor]:
    """The int lists as int64 tensors on ``device`` in one copy (pinned memory on CUDA)."""
    flat = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, start = [], 0
    for values in lists:
        out.append(flat[start : start + len(values)])
        start += len(values)
    return out


class PackedRunner:
    """Scores batches in packed forwards through ``kernel``; shares and caches problem prefixes."""

    def __init__(self, model: Any, device: torch.device, kernel: Kernel, *, chunk_tokens: int,
                 prefix_reuse: bool, cache_bytes: int) -> None:
        self.model = model
        self.device = device
        self.kernel = kernel
        self.chunk_tokens = chunk_tokens
        self.prefix_reuse = prefix_reuse
        self.cache = PrefixCache(cache_bytes)
        config = model.config
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype = next(model.base_model.parameters()).dtype
        self._no_masks = {t: None for t in (getattr(config, "layer_types", None) or ["full_attention"])}

    def batch_cost(self) -> PackedCost:
        """The batcher's cost of a batch: uncached prefixes once plus every item's own tokens."""
        return PackedCost(self.prefix_reuse, self.cache.__contains__)

    def prefix_bytes(self, tokens: int) -> int:
        """Device bytes of the stored states of a ``tokens``-long prefix."""
        return self.layers * 2 * self.kv_heads * self.head_dim * tokens * self.dtype.itemsize

    def run(self, items: Sequence[EncodedItem]) -> tuple[list[float], BatchStats]:
        """Raw logits in input order and the tokens computed (no padding: both counts equal)."""
        kept: dict[ProblemKey, CachedPrefix] = {}

        def stored(key: ProblemKey) -> tuple[int, ...] | None:
            entry = self.cache.get(key)
            if entry is not None:
                kept[key] = entry
            return entry.tokens if entry is not None else None

        plans = plan_batch(items, reuse=self.prefix_reuse, chunk_tokens=self.chunk_tokens,
                           keep_single=self.cache.max_bytes > 0, stored=stored)
        states = {key: entry.states for key, entry in kept.items()}
        results: list[float | None] = [None] * len(items)
        new: dict[ProblemKey, CachedPrefix] = {}
        for plan in plans:
            self._forward(plan, states, results, new)
        for key, entry in new.items():
            self.cache.put(key, entry)
        assert all(r is not None for r in results)
        tokens = sum(plan.tokens for plan in plans)
        return [float(r) for r in results], BatchStats(tokens=tokens, padded_tokens=tokens)  # type: ignore[arg-type]

    def _forward(self, plan: ForwardPlan, states: dict[ProblemKey, torch.Tensor], results: list[float | None],
                 new: dict[ProblemKey, CachedPrefix]) -> None:
        """One packed forward of ``plan``: scores of its items, states of its captured prefixes."""
        segments = plan.segments
        lengths = [len(s.tokens) for s in segments]
        offsets = list(accumulate(lengths, initial=0))
        scored = [(offsets[i + 1] - 1, s.item) for i, s in enumerate(segments) if s.item is not None]
        calls = [c for c in (plan.row_prefixes, plan.stored_prefixes) if c is not None]
        row_ids = list(chain.from_iterable(s.tokens for s in segments))
        ids, positions, last, *cus = _upload(
            self.device, row_ids,
            list(chain.from_iterable(range(s.position, s.position + len(s.tokens)) for s in segments)),
            [row for row, _ in scored], offsets,
            *(list(accumulate(lens, initial=0)) for c in calls for lens in (c.q_lens, c.k_lens)),
        )
        cu = [t.to(torch.int32) for t in cus]
        own = Seqs.of(lengths, lengths, self.device)
        own.cu = (cu[0], cu[0])
        packed = PackedPass(self.kernel, own, [])
        for n, call in enumerate(calls):
            part = self._prefix_part(call, call is plan.stored_prefixes, states)
            part.seqs.cu = (cu[1 + 2 * n], cu[2 + 2 * n])
            packed.prefixes.append(part)
        for key, start, end in plan.captures:  # a prefix segment, or the first tokens of an item run whole
            buffer = torch.empty(self.layers, 2, end - start, self.kv_heads, self.head_dim,
                                 dtype=self.dtype, device=self.device)
            packed.captures.append((start, end, buffer))
            states[key] = buffer
            new[key] = CachedPrefix(tuple(row_ids[start:end]), buffer, buffer.numel() * buffer.element_size())
        hidden = self.model.base_model(
            input_ids=ids.unsqueeze(0), position_ids=positions.unsqueeze(0), attention_mask=self._no_masks,
            use_cache=False, codescaler_pass=packed,
        ).last_hidden_state[0]
        if scored:
            logits = self.model.score(hidden[last].float())[:, 0].tolist()
            for (_, item), value in zip(scored, logits, strict=True):
                results[item] = value  # type: ignore[index]

    def _prefix_part(self, call: PrefixCall, stored: bool, states: dict[ProblemKey, torch.Tensor]) -> _PrefixAttention:
        """Where a prefix call finds its keys: the row's first tokens, or the stored states (views, no copy)."""
        seqs = Seqs.of(call.q_lens, call.k_lens, self.device)
        if not stored:
            return _PrefixAttention(call.q_start, call.q_end, seqs, row_keys=sum(call.k_lens))
        parts = [states[key][:, :, :n] for key, n in zip(call.keys, call.k_lens, strict=True)]
        return _PrefixAttention(call.q_start, call.q_end, seqs, stored=parts)
