"""A real server over loopback with the tiny model: batching across requests, and the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.cli import add_settings_flags
from tests.helpers import ROOT, start_server, stop_server

pytestmark = pytest.mark.slow

PROBLEMS = [f"Problem {k}: read integers from stdin and print their {w}." for k, w in
            enumerate(["sum", "product", "maximum", "sorted order"])]


def response(k: int, j: int) -> str:
    body = "\n".join(f"    v{i} = {i * j + k}" for i in range(j + 1))
    return f"Solution {j}:\n```python\ndef solve():\n{body}\n    return v0\nprint(solve())\n```\n"


def batches_run(metrics_text: str) -> float:
    match = re.search(r"^codescaler_batch_items_count ([0-9.e+]+)$", metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


def test_single_item_requests_meet_in_batches_and_score_as_alone(model_cache: Path) -> None:
    proc, url = start_server(["--model", "tiny-random", "--max-wait-ms", "200"], model_cache)
    try:
        pairs = [(PROBLEMS[k], response(k, j)) for k in range(4) for j in range(8)]

        async def fire() -> list[dict[str, object]]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                replies = await asyncio.gather(*(
                    client.post("/v1/score", json={"items": [{"problem": p, "response": r}]}) for p, r in pairs))
                return [reply.json()["results"][0] for reply in replies]

        before = batches_run(httpx.get(f"{url}/metrics").text)
        together = asyncio.run(fire())
        forwards = batches_run(httpx.get(f"{url}/metrics").text) - before
        alone = []
        for p, r in pairs:
            reply = httpx.post(f"{url}/v1/score", json={"items": [{"problem": p, "response": r}]}, timeout=60)
            alone.append(reply.json()["results"][0])
        assert all(x["valid"] for x in together)
        assert forwards < len(pairs)
        assert [x["score"] for x in together] == pytest.approx([x["score"] for x in alone], abs=1e-5)
    finally:
        stop_server(proc)


def test_get_reward_over_the_network(live_server: str) -> None:
    prompt = "<|im_start|>user\n" + PROBLEMS[0] + "<|im_end|>\n<|im_start|>assistant\n"
    query = prompt + response(0, 3) + "<|im_end|>"
    reply = httpx.post(f"{live_server}/get_reward", json={"query": [query], "prompts": [prompt], "labels": [""]},
                       timeout=60)
    direct = httpx.post(f"{live_server}/v1/score",
                        json={"items": [{"problem": PROBLEMS[0], "response": response(0, 3)}]}, timeout=60)
    assert reply.status_code == 200
    assert reply.json()["rewards"] == pytest.approx([direct.json()["results"][0]["reward"]], abs=1e-6)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("model, reason", [
    ("/no/such/dir", "no such directory"),
    ("LARK-Lab/CodeScaler-8B", "LARK-Lab/CodeScaler-8B"),
])
def test_an_unloadable_model_exits_2_with_one_line(model: str, reason: str) -> None:
    done = run_cli("--model", model, "--port", "0")
    lines = [line for line in done.stderr.splitlines() if line.startswith("codescaler-serve:")]
    assert done.returncode == 2
    assert len(lines) == 1 and reason in lines[0] and "--model tiny-random" in lines[0]


def test_limits_that_cannot_hold_one_item_are_refused_at_start() -> None:
    done = run_cli("--model", "tiny-random", "--max-length", "4096", "--max-batch-tokens", "1024")
    assert done.returncode == 2
    assert "max_batch_tokens (1024) must be at least max_length (4096)" in done.stderr


def test_cli_beats_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from service.cli import parse_settings

    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    monkeypatch.setenv("CODESCALER_MAX_WAIT_MS", "7")
    monkeypatch.setenv("CODESCALER_PORT", "9001")
    monkeypatch.setenv("CODESCALER_API_KEY", "a,b")
    settings = parse_settings(vars(parser.parse_args(["--port", "9002", "--no-prefix-reuse"])))
    assert (settings.port, settings.max_wait_ms, settings.max_length) == (9002, 7.0, 4096)
    assert settings.prefix_reuse is False and settings.api_key == ["a", "b"]
    repeated = parse_settings(vars(parser.parse_args(["--api-key", "x", "--api-key", "y"])))
    assert repeated.api_key == ["x", "y"]
