"""The loopback soak, bounded to 30 seconds for CI: mixed traffic at ~80% of measured capacity
against the real CLI with the tiny model; no errors, bounded memory growth, a clean exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_a_30_second_soak_has_no_errors_and_bounded_memory_growth(model_cache: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "loadtests/soak.py", "--duration", "30", "--warmup", "10", "--capacity-seconds", "5",
         "--server-args", f"--model tiny-random --model-cache-dir {model_cache}",
         "--server-log", str(tmp_path / "server.log")],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert '"errors": 0' in proc.stdout and "SOAK PASSED" in proc.stdout
