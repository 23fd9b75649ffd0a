"""Hostile input: a clear 4xx or a per-item error, never a 500 and never a crash; and the
service never executes submitted code (a canary that would create a file if it ran)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.helpers import FakeScorer, app_client

CODE = "```python\ndef f(x):\n    return x + 1\n```"
JSON = {"content-type": "application/json"}

# (path, raw body, expected status, expected error code)
MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("/get_reward", b"[" * 100_000 + b"]" * 100_000, 400, "bad_request"),
    ("/get_reward", b'{"query": ["a"], "labels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "bad_request"),
    ("/v1/score", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400, "bad_request"),
    ("/v1/rank", b'{"problem": "p", "responses": ["r"], "top_k": ' + b"9" * 5000 + b"}", 400, "bad_request"),
    ("/v1/rank", b'{"problem": "p", "responses": ["r"], "top_k": 1e999}', 422, "invalid_request"),
    ("/v1/rank", b'{"problem": "p", "responses": ["r"], "top_k": NaN}', 422, "invalid_request"),
    ("/v1/rank", b'{"problem": "p", "responses": ["r"], "top_k": -1}', 422, "invalid_request"),
    ("/v1/score", b'{"items": [{"problem": "\\ud800", "response": "r"}]}', 422, "invalid_request"),
    ("/v1/score", b'{"items": [{"problem": "p", "response": "\\udfff tail"}]}', 422, "invalid_request"),
    ("/v1/score", b'{"items": [{"problem": "p", "response": "r", "language": "\\ud800"}]}', 422, "invalid_request"),
    ("/v1/rank", b'{"problem": "p", "responses": ["ok", "\\ud83d"]}', 422, "invalid_request"),
    ("/get_reward", b'{"query": ["\\ud800"]}', 422, "invalid_request"),
    ("/get_reward", b'{"query": ["q"], "prompts": ["\\udc00"]}', 422, "invalid_request"),
    ("/v1/score", b'{"\\ud800": 1, "items": [{"problem": "p", "response": "r"}]}', 422, "invalid_request"),
    ("/v1/score", b'{"items": [{"problem": "p", "response": "\xff\xfe not utf-8"}]}', 400, "bad_request"),
    ("/v1/score", b'{"items": [', 422, "invalid_request"),
    ("/v1/score", b"", 422, "invalid_request"),
    ("/v1/score", b"null", 422, "invalid_request"),
    ("/v1/score", b'{"items": "' + b"x" * 1000 + b'"}', 422, "invalid_request"),
    ("/v1/score", b'{"items": [], "extraction": "exec"}', 422, "invalid_request"),
]


def app_with(**overrides: object):  # type: ignore[no-untyped-def]
    return create_app(Settings(model="fake", **overrides), FakeScorer())  # type: ignore[arg-type]


@pytest.mark.parametrize(("path", "body", "status", "code"), MALFORMED)
async def test_malformed_and_hostile_json_is_a_clear_4xx(path: str, body: bytes, status: int, code: str) -> None:
    async with app_client(app_with()) as client:
        r = await client.post(path, content=body, headers=JSON)
        alive = await client.get("/ready")
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert alive.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml", None])
async def test_a_body_that_is_not_json_is_422(content_type: str | None) -> None:
    body = json.dumps({"items": [{"problem": "p", "response": CODE}]})
    headers = {"content-type": content_type} if content_type else {}
    async with app_client(app_with()) as client:
        r = await client.post("/v1/score", content=body, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


async def test_errors_echo_client_keys_short_and_unknown_routes_in_the_same_shape() -> None:
    huge_key = "k" * 100_000
    async with app_client(app_with()) as client:
        r = await client.post("/v1/score", json={huge_key: 1, "items": [{"problem": "p", "response": "r"}]})
        missing = await client.get("/nope")
        wrong_method = await client.delete("/v1/score")
    assert r.status_code == 422 and len(r.content) < 1000
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_megabyte_strings_are_refused_before_work_and_nul_bytes_are_per_item() -> None:
    megabyte = "x" * 1_000_000
    async with app_client(app_with()) as client:
        big = await client.post("/v1/score", json={"items": [{"problem": megabyte, "response": CODE}]})
        nul = await client.post("/v1/score", json={"items": [
            {"problem": "p\x00q", "response": "```python\nx = '\x00'\n```"},
            {"problem": "p\x00q", "response": "text \x00 then " + CODE}]})
    assert big.status_code == 413
    assert nul.status_code == 200
    first, second = nul.json()["results"]
    assert first["error"] == "syntax_error" and not first["valid"]  # a NUL byte in source is no program
    assert second["valid"]


# --- through a real server with the tiny model: real extraction, real tokenizer -------------

# (language, response, extraction status): deep, long and odd text for the real parsers and tokenizer
HOSTILE_CODE: list[tuple[str, str, str]] = [
    ("python", "```python\n" + "(" * 100_000 + "\n```", "syntax_error"),  # past the parser's nesting limit
    ("python", "```python\nx = " + "[" * 150 + "]" * 150 + "\n```", "ok"),  # deep but valid
    ("python", "```python\nx = " + "-" * 100_000 + "1\n```", "syntax_error"),  # a deep unary chain
    ("javascript", "```javascript\nlet x = " + "[" * 50_000 + "]" * 50_000 + ";\n```", "ok"),  # deep, valid
    ("c", "```c\nint f() {" + "{" * 100_000 + "\n```", "syntax_error"),
    ("python", "```python\n" + "x = 1\n" * 20_000 + "```", "ok"),  # 120 kB: far past max_length tokens
    ("python", "```python\nprint('\u202e\u200b\ufeff\U0001f600\x7f')\n```", "ok"),
    ("python", "```python\n" + "x = 1\n" * 60_000 + "```", "syntax_error"),  # 360 kB: past the ast.parse bound
]


@pytest.mark.slow
def test_the_real_tokenizer_and_parsers_survive_hostile_text(live_server: str) -> None:
    odd = "\u202e\u200b\ufeff\U0001f600\x00\x7f"
    items = [{"problem": "p\x00" + odd, "response": response, "language": language}
             for language, response, _ in HOSTILE_CODE]
    items.append({"problem": odd * 10_000, "response": CODE})
    r = httpx.post(f"{live_server}/v1/score", json={"items": items}, timeout=300)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["extraction"]["status"] for x in results] == [status for *_, status in HOSTILE_CODE] + ["ok"]
    for result in results:  # scored, or a per-item reason; never a lost item
        assert (result["valid"] and result["score"] is not None) or result["error"] in ("syntax_error", "too_long")
    assert results[1]["valid"] and results[6]["valid"] and results[8]["valid"]
    assert results[5]["error"] == "too_long" or results[5]["truncated"]
    surrogate = httpx.post(f"{live_server}/v1/score", content=b'{"items": [{"problem": "\\ud800", "response": "r"}]}',
                           headers=JSON, timeout=60)
    assert surrogate.status_code == 422
    assert httpx.get(f"{live_server}/ready", timeout=10).status_code == 200


@pytest.mark.slow
def test_submitted_code_is_never_executed(live_server: str, tmp_path: Path) -> None:
    """Each canary would create a file if the service ran, imported or evaluated it."""
    canaries = [tmp_path / f"canary-{i}" for i in range(4)]
    python = (f"```python\nimport pathlib\npathlib.Path({str(canaries[0])!r}).write_text('ran')\n"
              f"__import__('os').system('touch {canaries[1]}')\n```")
    c_code = f'```c\n#include <stdlib.h>\nint main(void) {{ system("touch {canaries[2]}"); return 0; }}\n```'
    js = f"```javascript\nrequire('fs').writeFileSync({str(canaries[3])!r}, 'ran');\n```"
    score = httpx.post(f"{live_server}/v1/score", timeout=120, json={"return_code": True, "items": [
        {"problem": python, "response": python}, {"problem": "p", "response": c_code, "language": "c"},
        {"problem": "p", "response": js, "language": "javascript"}]})
    rank = httpx.post(f"{live_server}/v1/rank", json={"problem": python, "responses": [python, python]}, timeout=120)
    query = "<|im_start|>user\nwrite it<|im_end|>\n<|im_start|>assistant\n" + python
    reward = httpx.post(f"{live_server}/get_reward", json={"query": [query]}, timeout=120)
    assert [r.status_code for r in (score, rank, reward)] == [200, 200, 200]
    # The canaries really went through extraction, validation and the model...
    assert all(x["valid"] and x["score"] is not None for x in score.json()["results"])
    assert "pathlib.Path" in score.json()["results"][0]["extraction"]["code"]
    assert reward.json()["extra_logs"]["valid"] == [1.0]
    # ...and nothing ran them.
    assert [c.exists() for c in canaries] == [False] * 4
