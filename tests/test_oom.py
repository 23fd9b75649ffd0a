"""Out of memory that recovers: a real allocation failure inside the scorer, halving, per-item failure, still ready.

The main test runs tests/oom_child.py in its own process: the tiny model on the CUDA
path's reference kernel, the app in process, and an address-space limit that the
CPU allocator itself runs into (nothing is raised by the test). The rest are tables
of what counts as an allocation failure and how the scorer answers one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from models.base import EncodedItem, OutOfMemory
from models.hf import HFScorer
from models.memory import is_allocation_failure
from tests.helpers import ROOT


@pytest.mark.slow
def test_a_real_allocation_failure_halves_the_batch_and_the_service_stays_ready(model_cache: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "oom_child.py"), str(model_cache)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DefaultCPUAllocator: can't allocate memory" in done.stderr  # the allocator's own failure
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"] == 200
    attempts = out["attempts"]
    assert attempts[0] == [33, False]  # the whole batch did not fit
    assert any(ok for _, ok in attempts) and all(n == 1 for n, ok in attempts if not ok and n == 1)
    # Every rollout got its exact lone score; the item that alone does not fit, out_of_memory.
    assert out["errors"][:32] == [None] * 32
    assert out["scores"][:32] == pytest.approx(out["expected"], abs=1e-5)
    assert out["errors"][32] == "out_of_memory" and out["scores"][32] is None
    assert [1, False] in attempts
    # The service stays ready and scores the next request.
    assert out["ready"] == 200 and out["after_status"] == 200
    assert out["after_scores"] == pytest.approx(out["expected"][:2], abs=1e-5)


@pytest.mark.parametrize(("exc", "expected"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("FlashAttention: failed to allocate workspace"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)"), False),
    (ValueError("out of memory"), False),  # not a RuntimeError: a bug of ours, not the device
])
def test_what_counts_as_an_allocation_failure(exc: BaseException, expected: bool) -> None:
    assert is_allocation_failure(exc) is expected


@pytest.fixture
def scorer(model_cache: Path) -> HFScorer:
    return HFScorer("tiny-random", cache_dir=model_cache, device="cpu", dtype="float32")


@pytest.mark.parametrize("failure", [
    torch.OutOfMemoryError("CUDA out of memory (from the runner)"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasSgemm`"),
])
def test_an_allocation_failure_becomes_out_of_memory_and_frees_the_prefix_cache(
        scorer: HFScorer, failure: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    items = [scorer.encode("Square it.", f"print({k})") for k in range(3)]
    scorer.score(items)
    assert len(scorer.runner.cache) == 1  # type: ignore[union-attr]

    def fails(batch: Sequence[EncodedItem]) -> None:
        raise failure

    monkeypatch.setattr(scorer.runner, "run", fails)
    with pytest.raises(OutOfMemory) as raised:
        scorer.score(items)
    assert raised.value.__context__ is None  # raised after the handler: the failed forward is not kept alive
    assert len(scorer.runner.cache) == 0  # type: ignore[union-attr]


def test_other_runtime_errors_are_not_taken_for_memory(scorer: HFScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(batch: Sequence[EncodedItem]) -> None:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(scorer.runner, "run", fails)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        scorer.score([scorer.encode("Square it.", "print(1)")])
