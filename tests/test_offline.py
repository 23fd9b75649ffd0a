"""``codescaler-serve score|rank`` as a real process on files with good, malformed and
extra-field lines: the output, the skipped-line report, --strict, and rewards equal to
the live server's for the same pairs (same engine, same batching rules).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.offline import BadLine, parse_line, quantile
from service.settings import Settings
from tests.helpers import ROOT

PROBLEM_A = "Write a Python function add(a, b) that returns a + b."
PROBLEM_B = "Write a Python function rev(s) that reverses the string s."
GOOD_ADD = "```python\ndef add(a, b):\n    return a + b\n```"
GOOD_REV = "Here:\n```python\ndef rev(s):\n    return s[::-1]\n```"
BROKEN = "```python\ndef rev(s:\n```"


def run_cli(mode: str, source: Path, target: Path, model_cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "service", mode, "--model", "tiny-random", "--model-cache-dir", str(model_cache),
           "--log-level", "warning", str(source), "-o", str(target), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


SCORE_LINES = [
    json.dumps({"problem": PROBLEM_A, "response": GOOD_ADD, "id": "a1", "meta": {"split": "test", "n": [1, 2]}}),
    json.dumps({"problem": PROBLEM_A, "response": "I cannot write code."}),
    "{this is not json",
    json.dumps({"problem": PROBLEM_B, "id": "no-response"}),
    "",
    json.dumps({"problem": PROBLEM_B, "response": GOOD_REV, "id": "b1", "language": "python"}),
    json.dumps(["a", "list"]),
    json.dumps({"problem": PROBLEM_B, "response": BROKEN, "id": "b2"}),
]


@pytest.mark.parametrize("line,reason", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"problem": "p", "response": "\\ud800"}', "lone surrogate"),
    (b'{"problem": "p", "response": 3}', '"response" must be a string'),
    (b'{"problem": "p", "response": "r", "language": 1}', '"language" must be a string'),
    (b'{"problem": "' + b"x" * 101 + b'", "response": "r"}', "101 characters; the limit is 100"),
    (b'{"problem": "p", "responses": ["a", 2]}', '"responses[1]" must be a string'),
])
def test_malformed_lines_say_why(line: bytes, reason: str) -> None:
    settings = Settings(model="tiny-random", max_chars_per_field=100)
    mode = "rank" if b"responses" in line else "score"
    with pytest.raises(BadLine, match=re.escape(reason)):
        parse_line(line, mode, settings)


def test_good_lines_keep_every_field() -> None:
    settings = Settings(model="tiny-random")
    record, items = parse_line(b'{"problem": "p", "responses": ["a", "b"], "language": "cpp", "k": [1]}',
                               "rank", settings) or ({}, [])
    assert record["k"] == [1] and [(i.problem, i.response, i.language) for i in items] == [
        ("p", "a", "cpp"), ("p", "b", "cpp")]
    assert parse_line(b"   \n", "score", settings) is None


def test_quantile_interpolates_like_numpy() -> None:
    import numpy as np

    values = sorted([0.0, 0.0, 0.3, 1.2, 2.5, 7.0, 0.7])
    for q in (0.1, 0.5, 0.9):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    assert quantile([4.0], 0.9) == 4.0


@pytest.mark.slow
def test_score_file(tmp_path: Path, model_cache: Path, live_server: str) -> None:
    source = write_lines(tmp_path / "in.jsonl", SCORE_LINES)
    target = tmp_path / "out" / "scored.jsonl"
    done = run_cli("score", source, target, model_cache, "--chunk-items", "1")  # several chunks in flight
    assert done.returncode == 0, done.stderr

    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r.get("id") for r in rows] == ["a1", None, "b1", "b2"]  # good lines, input order
    assert rows[0]["meta"] == {"split": "test", "n": [1, 2]}  # extra fields carried through
    assert rows[2]["language"] == "python"
    assert [r["valid"] for r in rows] == [True, False, True, False]
    assert [r["extraction_status"] for r in rows] == ["ok", "no_code", "ok", "syntax_error"]
    assert rows[1]["reward"] == 0.0 and rows[1]["score"] is None and rows[1]["error"] == "no_code"
    assert all(set(r) >= {"reward", "score", "valid", "extraction_status", "error", "truncated", "tokens"} for r in rows)

    # Each malformed line is reported with its number; blank lines are not malformed.
    assert f"{source}:3: not JSON" in done.stderr
    assert f'{source}:4: "response" is missing; skipped' in done.stderr
    assert f"{source}:7: not a JSON object" in done.stderr
    assert f"{source}:5:" not in done.stderr
    assert "item/s" in done.stderr  # the progress bar (rate and ETA) on stderr
    assert "4 lines scored, 3 skipped" in done.stderr
    assert "valid: 2/4 (50.0%)" in done.stderr and "p50" in done.stderr
    assert sorted(p.name for p in target.parent.iterdir()) == ["scored.jsonl"]  # no temporary file left

    items = [{"problem": r["problem"], "response": r["response"]} for r in rows]
    served = httpx.post(f"{live_server}/v1/score", json={"items": items}, timeout=60).json()["results"]
    assert [r["reward"] for r in rows] == pytest.approx([s["reward"] for s in served], abs=1e-5)
    assert [r["score"] for r in rows if r["valid"]] == pytest.approx(
        [s["score"] for s in served if s["valid"]], abs=1e-5)


@pytest.mark.slow
def test_strict_stops_at_the_first_malformed_line(tmp_path: Path, model_cache: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", SCORE_LINES)
    target = tmp_path / "scored.jsonl"
    target.write_text("previous results\n", encoding="utf-8")
    done = run_cli("score", source, target, model_cache, "--strict")
    assert done.returncode == 1
    assert f"{source}:3: not JSON" in done.stderr and "stopping (--strict)" in done.stderr
    assert f"{source}:4:" not in done.stderr  # stopped at the first one
    assert target.read_text(encoding="utf-8") == "previous results\n"  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "scored.jsonl"]


@pytest.mark.slow
def test_rank_file_with_a_settings_flag(tmp_path: Path, model_cache: Path, live_server: str) -> None:
    responses = ["no code", GOOD_ADD, BROKEN, "```python\ndef add(a, b): return b + a\n```"]
    lines = [json.dumps({"problem": PROBLEM_A, "responses": responses, "id": 7}),
             json.dumps({"problem": PROBLEM_A, "responses": []}),
             json.dumps({"problem": PROBLEM_B, "responses": [GOOD_REV], "tags": ["x"]})]
    source = write_lines(tmp_path / "rank.jsonl", lines)
    target = tmp_path / "ranked.jsonl"
    done = run_cli("rank", source, target, model_cache, "--shaping", "none", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f'{source}:2: "responses" must be a non-empty list of strings; skipped' in done.stderr
    assert "item/s]" not in done.stderr  # --no-progress

    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r.get("id") for r in rows] == [7, None] and rows[1]["tags"] == ["x"]
    served = httpx.post(f"{live_server}/v1/rank", json={"problem": PROBLEM_A, "responses": responses,
                                                        "shaping": "none"}, timeout=60).json()
    first = rows[0]
    assert (first["best"], first["ranking"]) == (served["best"], served["ranking"])
    assert first["rewards"] == pytest.approx([s["reward"] for s in served["results"]], abs=1e-5)
    assert first["valid"] == [False, True, False, True]
    # --shaping none reached the engine: rewards are the raw scores, not softplus of them.
    assert first["rewards"][1] == pytest.approx(first["scores"][1], abs=1e-9)
    assert rows[1]["best"] == 0 and rows[1]["ranking"] == [0]
