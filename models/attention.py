"""Varlen attention kernels behind one contract, and the start-up check of the device kernel.

The contract (what models/varlen.py calls, once or twice per layer):
``kernel(q, k, v, seqs, causal, scale) -> (out, lse)`` with
- ``q`` ``[T_q, H, D]``, ``k``/``v`` ``[T_k, H_kv, D]`` (H a multiple of H_kv, grouped as
  repeat_kv does: query head h reads kv head h // (H / H_kv));
- ``seqs`` the offsets of the sequences in q and k (``Seqs``, built once per forward);
- ``causal``: query i of a sequence sees keys j <= i + (k_len - q_len) (aligned
  bottom-right, so a suffix sees its whole prefix); otherwise every key of its sequence;
- ``out`` ``[T_q, H, D]`` in q's dtype and ``lse`` ``[H, T_q]`` float32, the natural
  log-sum-exp of each query's scaled scores (what the cascade merge needs).

Three kernels keep it:
- ``torch_varlen``: torch.nn.attention.varlen.varlen_attn (FlashAttention-2 inside the
  torch wheel, or FA3 when activated); CUDA only; one call for all sequences.
- ``cpu_fused``: PyTorch's fused CPU flash kernel, one call per sequence.
- ``reference``: plain matrix products in float32, any device; the test double of the
  CUDA kernel, so that every other line of the CUDA path runs in the CPU tests.

``check_kernel`` compares a kernel with ``reference`` on a small random problem that
tells the layouts apart (H != T_q; a causal sequence with q shorter than k) and is run
once at warm-up (``verify``), so a kernel whose layout changed refuses to start instead of
silently computing wrong scores; FA3 that fails is switched back to the wheel's FA2 first.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from models.base import first_line

log = logging.getLogger(__name__)

#: (q, k, v, seqs, causal, scale) -> (out [T_q, H, D], lse [H, T_q] float32)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "Seqs", bool, float | None],
                  tuple[torch.Tensor, torch.Tensor]]


class KernelMismatch(RuntimeError):
    """The device kernel's output or layouts differ from the contract; scores would be wrong."""


@dataclass(slots=True)
class Seqs:
    """Offsets of N sequences in packed q and k, on the host, with device copies made once.

    ``q_bounds[i]`` and ``k_bounds[i]`` are the (start, end) of sequence i. The int32
    cumulative tensors are built on first use and reused by every layer, so a forward
    makes one host-to-device copy per kind of call, not one per layer.
    """

    q_bounds: list[tuple[int, int]]
    k_bounds: list[tuple[int, int]]
    device: torch.device
    #: ``cu_seq_q`` and ``cu_seq_k`` when the caller uploaded them already (models/varlen.py).
    cu: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, q_lens: Sequence[int], k_lens: Sequence[int], device: torch.device) -> Seqs:
        """Sequences of the given lengths laid out one after another in q and in k."""
        return cls(_bounds(q_lens), _bounds(k_lens), device)

    @property
    def max_q(self) -> int:
        """Longest query sequence (varlen kernels size their grid by it)."""
        return max((e - s for s, e in self.q_bounds), default=0)

    @property
    def max_k(self) -> int:
        """Longest key sequence."""
        return max((e - s for s, e in self.k_bounds), default=0)

    def cumulative(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``cu_seq_q`` and ``cu_seq_k`` as int32 tensors on the device ([N + 1] each)."""
        if self.cu is None:
            q = [0, *(e for _, e in self.q_bounds)]
            k = [0, *(e for _, e in self.k_bounds)]
            both = torch.tensor([q, k], dtype=torch.int32).to(self.device)
            self.cu = (both[0], both[1])
        return self.cu


def _bounds(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of consecutive runs of ``lengths``."""
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Seqs, causal: bool,
              scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract in plain float32 matrix products, sequence by sequence (any device)."""
    heads, dim = q.shape[1], q.shape[2]
    groups = heads // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    out = q.new_empty(q.shape)
    lse = torch.empty(heads, q.shape[0], dtype=torch.float32, device=q.device)
    for (qs, qe), (ks, ke) in zip(seqs.q_bounds, seqs.k_bounds, strict=True):
        qh = q[qs:qe].float().transpose(0, 1)  # [H, q, D]
        kh = k[ks:ke].float().repeat_interleave(groups, dim=1).transpose(0, 1)
        vh = v[ks:ke].float().repeat_interleave(groups, dim=1).transpose(0, 1)
        scores = qh @ kh.transpose(1, 2) * scale  # [H, q, k]
        if causal:
            n_q, n_k = qe - qs, ke - ks
            rows = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
            scores = scores.masked_fill(torch.arange(n_k, device=q.device)[None, :] > rows, float("-inf"))
        seq_lse = torch.logsumexp(scores, dim=-1)  # [H, q]
        out[qs:qe] = (torch.exp(scores - seq_lse[..., None]) @ vh).transpose(0, 1).to(q.dtype)
        lse[:, qs:qe] = seq_lse
    return out, lse


def cpu_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Seqs, causal: bool,
              scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU flash attention per sequence (it returns the log-sum-exp too).

    A non-causal sequence folds the query heads of one kv head into its query length
    (one call per kv head group, no expanded keys); a causal one cannot (its mask
    depends on the query position) and reads expanded keys instead.
    """
    total, heads, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    out = q.new_empty(q.shape)
    lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for (qs, qe), (ks, ke) in zip(seqs.q_bounds, seqs.k_bounds, strict=True):
        n_q = qe - qs
        if n_q == 0:
            continue
        qh = q[qs:qe].view(n_q, kv_heads, groups, dim).permute(1, 2, 0, 3)  # [KV, G, q, D]
        kh = k[ks:ke].transpose(0, 1).unsqueeze(1)  # [KV, 1, k, D]
        vh = v[ks:ke].transpose(0, 1).unsqueeze(1)
        if causal:
            if n_q != ke - ks:
                raise ValueError("cpu_fused: a causal sequence needs as many keys as queries")
            shape = (kv_heads, groups, n_q, dim)
            o, l = flash(qh, kh.expand(shape), vh.expand(shape), 0.0, True, scale=scale)
        else:
            folded = qh.reshape(kv_heads, 1, groups * n_q, dim)
            o, l = flash(folded, kh, vh, 0.0, False, scale=scale)
        out[qs:qe] = o.reshape(heads, n_q, dim).transpose(0, 1)
        lse[:, qs:qe] = l.reshape(heads, n_q)
    return out, lse


def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: Seqs, causal: bool,
                 scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's varlen_attn over every sequence in one call (CUDA; FlashAttention inside torch).

    ``num_splits=1`` keeps a sequence's result independent of what else is in the batch.
    """
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    cu_q, cu_k = seqs.cumulative()
    out, lse = varlen_attn(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, seqs.max_q, seqs.max_k,
        return_aux=AuxRequest(lse=True), scale=scale, window_size=(-1, 0) if causal else (-1, -1),
        enable_gqa=q.shape[1] != k.shape[1], num_splits=1,
    )
    return out, lse


KERNELS: dict[str, Kernel] = {"torch_varlen": torch_varlen, "cpu_fused": cpu_fused, "reference": reference}


def choose(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel for ``name``. 'auto': torch_varlen on CUDA in bf16/fp16, cpu_fused on a CPU.

    FlashAttention has no float32 kernel, so float32 on CUDA (a precision check, not a
    serving mode) takes the reference kernel: exact, slower, memory quadratic per sequence.
    """
    if name != "auto":
        if name not in KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; choose from {sorted(KERNELS)}")
        return name
    if device.type != "cuda":
        return "cpu_fused"
    return "reference" if dtype == torch.float32 else "torch_varlen"


def select(name: str, device: torch.device, dtype: torch.dtype) -> tuple[str, bool]:
    """The kernel for ``name`` on this device (``choose``), and whether FA3 was switched in behind it."""
    chosen = choose(name, device, dtype)
    return chosen, chosen == "torch_varlen" and activate_fa3(device)


def activate_fa3(device: torch.device) -> bool:
    """Swap FlashAttention-3 in behind varlen_attn where its package is installed on sm90."""
    if device.type != "cuda" or importlib.util.find_spec("flash_attn_interface") is None:
        return False
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    from torch.nn.attention import activate_flash_attention_impl

    try:
        activate_flash_attention_impl("FA3")
    except (ValueError, RuntimeError, ImportError) as exc:
        log.warning("FlashAttention-3 is installed but could not be activated (%s); using FA2", exc)
        return False
    return True


def deactivate_fa3() -> None:
    """Put torch's own FlashAttention-2 back behind varlen_attn (after FA3 failed the check)."""
    from torch.nn.attention import restore_flash_attention_impl

    restore_flash_attention_impl(_raise_warn=False)


def verify(name: str, device: torch.device, dtype: torch.dtype, *, fa3: bool) -> bool:
    """Check kernel ``name`` on the device at warm-up; return whether FA3 stays switched in.

    With FA3 switched in, a failure switches it out and checks the torch wheel's
    FlashAttention-2 instead (a newer FA3 build must not stop a server that FA2 can
    run); any other failure raises KernelMismatch (one line), which refuses the start.
    """
    failure = _failure(name, device, dtype)
    if failure is not None and fa3:
        log.warning("FlashAttention-3 fails the kernel check (%s); switching back to FlashAttention-2", failure)
        deactivate_fa3()
        fa3, failure = False, _failure(name, device, dtype)
    if failure is not None:
        raise failure
    return fa3


def _failure(name: str, device: torch.device, dtype: torch.dtype) -> KernelMismatch | None:
    """Why kernel ``name`` breaks the contract, or None. A kernel that raises breaks it too."""
    try:
        check_kernel(KERNELS[name], device, dtype, bottom_right=name != "cpu_fused")  # cpu_fused: never asked
    except KernelMismatch as exc:
        return exc
    except RuntimeError as exc:
        return KernelMismatch(f"the kernel raised {type(exc).__name__}: {first_line(exc)}")
    return None


def check_kernel(kernel: Kernel, device: torch.device, dtype: torch.dtype, *, bottom_right: bool = True,
                 heads: int = 4, kv_heads: int = 2, dim: int = 64) -> None:
    """Raise KernelMismatch unless ``kernel`` agrees with ``reference`` on layouts and values.

    Three sequences with 7, 1 and 12 queries (T_q = 20 differs from H, so a transposed
    log-sum-exp is caught), run causal and non-causal; with ``bottom_right`` the second
    and third have fewer queries than keys (the causal alignment of a suffix after its
    prefix). ``cpu_fused`` is checked without it: the runner never asks it for that.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    q_lens, k_lens = [7, 1, 12], ([7, 9, 30] if bottom_right else [7, 1, 12])
    q = torch.randn(sum(q_lens), heads, dim, generator=gen).to(device, dtype)
    k = torch.randn(sum(k_lens), kv_heads, dim, generator=gen).to(device, dtype)
    v = torch.randn(sum(k_lens), kv_heads, dim, generator=gen).to(device, dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for causal in (True, False):
        seqs = Seqs.of(q_lens, k_lens, device)
        want_out, want_lse = reference(q.float(), k.float(), v.float(), seqs, causal, None)
        got_out, got_lse = kernel(q, k, v, Seqs.of(q_lens, k_lens, device), causal, None)
        what = "causal" if causal else "non-causal"
        if tuple(got_lse.shape) != tuple(want_lse.shape):
            raise KernelMismatch(f"{what} log-sum-exp has shape {tuple(got_lse.shape)}, "
                                 f"the contract says {tuple(want_lse.shape)} ([H, T_q])")
        if tuple(got_out.shape) != tuple(want_out.shape):
            raise KernelMismatch(f"{what} output has shape {tuple(got_out.shape)}, expected {tuple(want_out.shape)}")
        out_err = (got_out.float() - want_out).abs().max().item()
        lse_err = (got_lse.float() - want_lse).abs().max().item()
        if not out_err <= tol or not lse_err <= tol * 10:
            raise KernelMismatch(f"{what} attention differs from the plain computation (output error "
                                 f"{out_err:.2e}, log-sum-exp error {lse_err:.2e}; masks or layouts changed)")
