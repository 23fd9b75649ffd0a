"""The side-by-side benchmark runs end to end (``--quick``) and writes well-formed results.

No timing assertions: numbers from a smoke run on a shared machine mean nothing.
What must hold is the shape of bench.json, a PNG chart, and that all three
contenders answered every item with the same scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_quick_benchmark_writes_json_chart_and_table(tmp_path: Path, model_cache: Path) -> None:
    done = subprocess.run([sys.executable, "loadtests/bench.py", "--quick", "--out", str(tmp_path),
                           "--model-cache", str(model_cache)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| workload | contender | items/s |" in done.stdout
    document = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(document["workloads"]) == {"grpo", "best_of_n", "mixed"}
    for name, workload in document["workloads"].items():
        assert set(workload["contenders"]) == {"a", "b", "c"}, name
        for key, run in workload["contenders"].items():
            assert run["errors"] == 0 and run["items"] == workload["items"] > 0, (name, key)
            for field in ("items_per_s", "tokens_per_s", "model_gflop_per_s", "gemm_peak_gflop_per_s",
                          "compute_efficiency"):
                assert isinstance(run[field], float) and run[field] > 0, (name, key, field)
            assert set(run["latency_s"]) == {"p50", "p95", "p99"}
            assert 0.0 <= run["padding_ratio"]["mean"] <= 1.0
        # Same requests, same model: every contender returned the same scores.
        assert workload["max_abs_score_diff"]["a"] < 1e-4 and workload["max_abs_score_diff"]["b"] < 1e-4
        # Prefix reuse ran fewer tokens than the items hold where problems repeat, never more.
        assert workload["contenders"]["c"]["tokens_run"] <= workload["contenders"]["b"]["tokens_run"]
    assert document["workloads"]["grpo"]["contenders"]["c"]["tokens_run"] < document["workloads"]["grpo"]["tokens"]
    half = document["half_rate"]
    assert half["errors"] == 0 and half["p99_s"] >= half["p50_s"] > 0
    assert set(document["targets"]) == {"grpo_items_c_over_a", "grpo_items_c_over_b", "padding_ratio_c",
                                        "compute_efficiency_c", "p99_over_p50_half_rate",
                                        "grpo_share_of_reuse_ceiling"}
    grpo = document["workloads"]["grpo"]
    assert grpo["reuse_ceiling"] > 1.0 and grpo["loop_items_per_s"] > 0  # groups of 8 share their problem
    assert document["workloads"]["mixed"]["reuse_ceiling"] == pytest.approx(1.0)  # nothing to share
    assert all(isinstance(t["met"], bool) for t in document["targets"].values())
