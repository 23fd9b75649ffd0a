"""The one-command GPU check runs end to end in its CPU mode (``--device cpu --quick``): same code, tiny shapes.

No timing assertions (a CPU smoke run's speed means nothing); what must hold is that
every figure the GPU run reports is there and sane, that bf16 packed scoring agrees
with the fp32 plain forward as far as bf16 allows, and that the forced out-of-memory
batch was recovered from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_in_its_cpu_mode(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run([sys.executable, "loadtests/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| (c) oom_recovered | True |" in done.stdout
    document = json.loads(out.read_text())
    exact = document["exactness"]
    assert exact["pairs"] == 64 and 0 < exact["mean_abs_diff"] <= exact["max_abs_diff"] < 0.5
    assert 0.0 <= exact["best_of_n_agreement"] <= 1.0
    grpo = document["grpo"]
    for key in ("items_per_s_reuse", "items_per_s_no_reuse", "mfu", "step_seconds", "gemm_peak_flop_per_s"):
        assert isinstance(grpo[key], float) and grpo[key] > 0, key
    assert grpo["items"] == 64 and grpo["model_flops_reuse"] < grpo["model_flops_no_reuse"]
    assert document["oom_recovered"] is True
    assert document["oom"]["attempts"][0][1] is False  # the forced batch really failed first
    assert document["kernel"] == {"kernel": "cpu_fused", "dtype": "float32", "fa3": False, "contract": "kept"}
    assert exact["served"]["attention_kernel"] == "cpu_fused" and exact["served"]["runner"] == "packed"
    assert document["failed"] == [] and "| attention kernel (contract checked) | cpu_fused |" in done.stdout


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_others_still_report(tmp_path: Path) -> None:
    """A first run on a new machine returns every figure it can; the failure is named, the exit code is 1."""
    out = tmp_path / "check.json"
    script = ("import sys; sys.path.insert(0, '.'); import loadtests.gpu_check as check\n"
              "def broken(*args, **kwargs):\n    raise RuntimeError('CUDA error: no kernel image\\nmore')\n"
              "check.check_grpo = broken\n"
              f"check.main(['--device', 'cpu', '--quick', '--out', {str(out)!r}])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_ARENA_MAX": "2"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["failed"] == ["grpo"]
    assert document["grpo"] == {"error": "RuntimeError: CUDA error: no kernel image"}
    assert document["exactness"]["pairs"] == 64 and document["oom_recovered"] is True
    assert "| grpo FAILED | RuntimeError: CUDA error: no kernel image |" in done.stdout
