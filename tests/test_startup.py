"""Startup and exit of the real CLI process: bind first (alive while the model loads), and a
forward stuck on the device cannot keep the process alive past the drain (exit code 3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.cli import EXIT_STUCK_MODEL
from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.slow
CODE = "```python\nprint(1)\n```"


def test_health_is_200_loading_and_ready_503_while_the_model_loads(tmp_path: Path) -> None:
    """The CLI's server loop with a load that lasts until the test ends it: observed mid-load."""
    loaded = tmp_path / "loaded"
    proc, url, log_path = _start(tmp_path, "--fake-load-until", str(loaded))
    try:
        health = _until(lambda: httpx.get(f"{url}/health", timeout=5), proc, log_path)
        assert health.status_code == 200 and health.json() == {"status": "loading"}
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["message"] == "loading"
        refused = httpx.post(f"{url}/v1/score", json={"items": [{"problem": "p", "response": CODE}]}, timeout=5)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        loaded.touch()
        _until(lambda: r if (r := httpx.get(f"{url}/ready", timeout=5)).status_code == 200 else None, proc, log_path)
        assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
        scored = httpx.post(f"{url}/v1/score", json={"items": [{"problem": "p", "response": CODE}]}, timeout=30)
        assert scored.status_code == 200 and scored.json()["results"][0]["valid"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_cli_binds_before_it_loads_the_model(tmp_path: Path) -> None:
    """The real CLI building tiny-random into an empty cache (seconds of torch import and build):
    its first answer comes while that runs. A CLI that loaded first would answer ``ok`` at once."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CODESCALER_MODEL_CACHE_DIR": str(tmp_path / "cache"),
           "CODESCALER_DRAIN_SECONDS": "0"}
    log_path = tmp_path / "cli.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", "tiny-random"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        first = _until(lambda: httpx.get(f"{url}/health", timeout=5), proc, log_path)
        assert first.json() == {"status": "loading"}
        _until(lambda: r if (r := httpx.get(f"{url}/ready", timeout=5)).status_code == 200 else None, proc, log_path)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_forward_stuck_past_the_drain_ends_the_process_with_exit_code_3(tmp_path: Path) -> None:
    proc, url, log_path = _start(tmp_path, "--fake-delay", "3600", "--request-timeout", "0.5",
                                 "--forward-timeout", "0.5")
    try:
        _until(lambda: r if (r := httpx.get(f"{url}/ready", timeout=5)).status_code == 200 else None, proc, log_path)
        stuck = httpx.post(f"{url}/v1/score", json={"items": [{"problem": "p", "response": CODE}]}, timeout=60)
        assert stuck.status_code == 504  # the forward sleeps for an hour
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)  # an hour, were the stuck thread waited for
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == EXIT_STUCK_MODEL, log_path.read_text(errors="replace")
    assert "codescaler-model" in log_path.read_text(errors="replace")


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``python -m tests.fake_server`` (the CLI's server loop, no model) on a free port."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.fake_server", "--host", "127.0.0.1", "--port",
                                 str(port), "--drain-seconds", "0", *args], cwd=ROOT, env=os.environ.copy(),
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log_path


def _until(probe, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    """Retry ``probe`` (connection errors and None count as not yet) until it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}: {log.read_text(errors='replace')}"
        try:
            result = probe()
            if result is not None:
                return result
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("the server never answered")
