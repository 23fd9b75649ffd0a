"""The varlen kernel contract: the CPU kernel and the reference agree, the start-up check catches broken layouts.

The CUDA kernel (torch's varlen_attn) cannot run here; the reference stands in for it
in every CPU test of the CUDA path, and ``check_kernel`` is what would refuse a device
kernel whose layouts differ. So the check itself is tested against kernels that are
wrong in exactly the ways a changed kernel could be: a transposed log-sum-exp, a
top-left causal mask, a base-2 log-sum-exp.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import attention
from models.attention import KernelMismatch, Seqs, check_kernel, cpu_fused, reference
from models.base import ModelLoadError
from models.hf import HFScorer


def problem(q_lens: list[int], k_lens: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 16):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), heads, dim, generator=gen)
    k = torch.randn(sum(k_lens), kv_heads, dim, generator=gen)
    v = torch.randn(sum(k_lens), kv_heads, dim, generator=gen)
    return q, k, v, Seqs.of(q_lens, k_lens, torch.device("cpu"))


def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence the textbook way: softmax over masked scores, keys repeated per query head."""
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) / q.shape[-1] ** 0.5
    if causal:
        shift = k.shape[0] - q.shape[0]
        allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + shift
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv), torch.logsumexp(scores, -1)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_is_the_textbook_attention_per_sequence(causal: bool) -> None:
    q_lens, k_lens = [3, 1, 6], [3, 5, 9]
    q, k, v, seqs = problem(q_lens, k_lens)
    out, lse = reference(q, k, v, seqs, causal, None)
    assert out.shape == q.shape and lse.shape == (4, sum(q_lens)) and lse.dtype == torch.float32
    for (qs, qe), (ks, ke) in zip(seqs.q_bounds, seqs.k_bounds, strict=True):
        want_out, want_lse = plain(q[qs:qe], k[ks:ke], v[ks:ke], causal)
        assert torch.allclose(out[qs:qe], want_out, atol=1e-5)
        assert torch.allclose(lse[:, qs:qe], want_lse, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_the_cpu_kernel_equals_the_reference(causal: bool) -> None:
    lengths = [4, 9, 1, 7]
    q, k, v, _ = problem(lengths, lengths if causal else [6, 2, 8, 3])
    seqs = Seqs.of(lengths, lengths if causal else [6, 2, 8, 3], torch.device("cpu"))
    got = cpu_fused(q, k, v, seqs, causal, 0.3)
    want = reference(q, k, v, seqs, causal, 0.3)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)


def test_the_check_passes_both_kernels_that_keep_the_contract() -> None:
    check_kernel(reference, torch.device("cpu"), torch.float32)
    check_kernel(cpu_fused, torch.device("cpu"), torch.float32, bottom_right=False)
    check_kernel(cpu_fused, torch.device("cpu"), torch.bfloat16, bottom_right=False)


def transposed_lse(q, k, v, seqs, causal, scale):  # type: ignore[no-untyped-def]
    out, lse = reference(q, k, v, seqs, causal, scale)
    return out, lse.transpose(0, 1).contiguous()  # (T_q, H), as varlen_attn's docstring says


def top_left_causal(q, k, v, seqs, causal, scale):  # type: ignore[no-untyped-def]
    """Causal masks aligned top-left: a suffix would not see the end of its prefix."""
    if not causal:
        return reference(q, k, v, seqs, causal, scale)
    out, lse = q.new_empty(q.shape), torch.empty(q.shape[1], q.shape[0])
    for (qs, qe), (ks, ke) in zip(seqs.q_bounds, seqs.k_bounds, strict=True):
        n = qe - qs
        one = Seqs.of([n], [n], q.device)
        o, l = reference(q[qs:qe], k[ks:ks + n], v[ks:ks + n], one, True, scale)
        out[qs:qe], lse[:, qs:qe] = o, l
    return out, lse


def base2_lse(q, k, v, seqs, causal, scale):  # type: ignore[no-untyped-def]
    out, lse = reference(q, k, v, seqs, causal, scale)
    return out, lse / torch.log(torch.tensor(2.0))


@pytest.mark.parametrize(("kernel", "message"), [
    (transposed_lse, "log-sum-exp has shape"),
    (top_left_causal, "differs from the plain computation"),
    (base2_lse, "differs from the plain computation"),
])
def test_the_check_refuses_a_kernel_that_breaks_the_contract(kernel, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KernelMismatch, match=message):
        check_kernel(kernel, torch.device("cpu"), torch.float32)


def test_a_broken_kernel_stops_the_warm_up_with_one_line(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(attention.KERNELS, "reference", transposed_lse)
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", kernel="reference")
    with pytest.raises(ModelLoadError) as raised:
        scorer.warmup()
    line = str(raised.value)
    assert "\n" not in line and "attention kernel reference" in line and "refusing" in line


def test_a_kernel_that_raises_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def raising(q, k, v, seqs, causal, scale):  # type: ignore[no-untyped-def]
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore detail")

    monkeypatch.setitem(attention.KERNELS, "reference", raising)
    with pytest.raises(KernelMismatch) as raised:
        attention.verify("reference", torch.device("cpu"), torch.float32, fa3=False)
    assert str(raised.value) == "the kernel raised RuntimeError: FlashAttention only supports Ampere GPUs or newer."


class SwitchableImpl:
    """Stands in for torch's flash-attention registry: FA3 (broken in a given way) until switched out."""

    def __init__(self, broken_fa3, broken_fa2=None) -> None:  # type: ignore[no-untyped-def]
        self.fa3_on, self.switched_out = True, 0
        self.broken_fa3, self.broken_fa2 = broken_fa3, broken_fa2

    def kernel(self, q, k, v, seqs, causal, scale):  # type: ignore[no-untyped-def]
        broken = self.broken_fa3 if self.fa3_on else self.broken_fa2
        return (broken or reference)(q, k, v, seqs, causal, scale)

    def deactivate(self) -> None:
        self.fa3_on = False
        self.switched_out += 1


@pytest.mark.parametrize("broken_fa3", [transposed_lse, top_left_causal])
def test_fa3_failing_the_check_is_switched_back_to_fa2(broken_fa3, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    impl = SwitchableImpl(broken_fa3)
    monkeypatch.setitem(attention.KERNELS, "reference", impl.kernel)
    monkeypatch.setattr(attention, "deactivate_fa3", impl.deactivate)
    assert attention.verify("reference", torch.device("cpu"), torch.float32, fa3=True) is False
    assert impl.switched_out == 1 and not impl.fa3_on


def test_fa3_that_keeps_the_contract_stays_and_fa2_failing_too_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = SwitchableImpl(None)
    monkeypatch.setitem(attention.KERNELS, "reference", kept.kernel)
    monkeypatch.setattr(attention, "deactivate_fa3", kept.deactivate)
    assert attention.verify("reference", torch.device("cpu"), torch.float32, fa3=True) is True
    assert kept.switched_out == 0
    both = SwitchableImpl(transposed_lse, base2_lse)
    monkeypatch.setitem(attention.KERNELS, "reference", both.kernel)
    monkeypatch.setattr(attention, "deactivate_fa3", both.deactivate)
    with pytest.raises(KernelMismatch, match="differs from the plain computation"):
        attention.verify("reference", torch.device("cpu"), torch.float32, fa3=True)
    assert both.switched_out == 1


def test_warm_up_reports_fa3_switched_out(model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    impl = SwitchableImpl(top_left_causal)
    monkeypatch.setitem(attention.KERNELS, "reference", impl.kernel)
    monkeypatch.setattr(attention, "deactivate_fa3", impl.deactivate)
    scorer = HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32", kernel="reference",
                      max_batch_tokens=1024, max_batch_items=8)
    scorer.fa3 = True  # as activate_fa3 leaves it on an sm90 GPU with flash_attn_interface installed
    scorer.warmup()
    assert impl.switched_out == 1 and scorer.info()["attention_kernel"] == "reference"


def test_switching_fa3_out_restores_torchs_default_implementation() -> None:
    from torch.nn.attention import current_flash_attention_impl

    attention.deactivate_fa3()  # nothing active here: a no-op that must not raise or warn
    assert current_flash_attention_impl() is None


def test_auto_picks_the_device_kernel() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention.choose("auto", cuda, torch.bfloat16) == "torch_varlen"
    assert attention.choose("auto", cuda, torch.float16) == "torch_varlen"
    assert attention.choose("auto", cuda, torch.float32) == "reference"  # FlashAttention has no fp32 kernel
    assert attention.choose("auto", cpu, torch.float32) == "cpu_fused"
    assert attention.choose("reference", cuda, torch.bfloat16) == "reference"
    with pytest.raises(ValueError, match="unknown attention kernel"):
        attention.choose("flash", cpu, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_varlen_keeps_the_contract_on_the_device(dtype: torch.dtype) -> None:
    check_kernel(attention.torch_varlen, torch.device("cuda"), dtype)


def test_fa3_is_switched_in_only_where_its_package_runs_on_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision around activate_flash_attention_impl, on the CPU (the call itself needs a GPU)."""
    import importlib.util

    import torch.nn.attention as torch_attention

    activated: list[str] = []
    monkeypatch.setattr(torch_attention, "activate_flash_attention_impl", activated.append)
    assert attention.activate_fa3(torch.device("cpu")) is False
    real_find_spec = importlib.util.find_spec
    for installed, capability, expected in [(False, (9, 0), False), (True, (8, 0), False), (True, (9, 0), True)]:
        def find_spec(name: str, package: str | None = None, installed: bool = installed) -> object:
            if name == "flash_attn_interface":
                return object() if installed else None
            return real_find_spec(name, package)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert attention.activate_fa3(torch.device("cuda")) is expected
    assert activated == ["FA3"]
