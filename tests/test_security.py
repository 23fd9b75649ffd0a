"""Security: bearer keys on every scoring route, CORS only when configured, and limits
enforced before any work (through a real server over loopback, chunked bodies included)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import check_keys_or_exit
from service.app import create_app
from service.settings import Settings
from tests.fake_server import serve_in_thread
from tests.fault_scorers import FaultScorer
from tests.helpers import ROOT, FakeScorer, app_client

CODE = "```python\ndef f(x):\n    return x + 1\n```"
KEYS = ["first-key", "second-key-\u00e9"]
QUERY = "<|im_start|>user\nadd one<|im_end|>\n<|im_start|>assistant\n" + CODE
ROUTES: list[tuple[str, str, dict[str, object] | None]] = [
    ("POST", "/v1/score", {"items": [{"problem": "p", "response": CODE}]}),
    ("POST", "/v1/rank", {"problem": "p", "responses": [CODE, CODE]}),
    ("POST", "/get_reward", {"query": [QUERY]}),
    ("GET", "/v1/models", None),
]


def app_with(scorer: FakeScorer | None = None, **overrides: object):  # type: ignore[no-untyped-def]
    return create_app(Settings(model="fake", **overrides), scorer or FakeScorer())  # type: ignore[arg-type]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(client: httpx.AsyncClient, method: str, path: str, body: object, headers: dict[str, str]) -> httpx.Response:
    # Keys may hold non-ASCII: send the header as UTF-8 bytes, as a client with such a key would.
    raw = {name: value.encode() for name, value in headers.items()}
    return await client.request(method, path, json=body, headers=raw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_scoring_routes_need_one_of_the_keys(method: str, path: str, body: object) -> None:
    scorer = FakeScorer()
    async with app_client(app_with(scorer, api_key=KEYS)) as client:
        refused = [await call(client, method, path, body, headers) for headers in (
            {}, bearer("wrong"), bearer(KEYS[0] + "x"), bearer(KEYS[0][:-1]), {"Authorization": f"Basic {KEYS[0]}"},
            {"Authorization": KEYS[0]}, bearer(""))]
        calls_after_refusals = list(scorer.calls)
        accepted = [await call(client, method, path, body, bearer(key)) for key in KEYS]
    for r in refused:
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
    assert calls_after_refusals == []  # nothing refused reached the model
    assert [r.status_code for r in accepted] == [200, 200]


async def test_health_and_ready_are_open_and_metrics_needs_a_key_unless_public() -> None:
    async with app_client(app_with(api_key=KEYS)) as client:
        open_routes = [(await client.get(path)).status_code for path in ("/health", "/ready")]
        metrics_without, metrics_with = await client.get("/metrics"), await client.get("/metrics", headers=bearer(KEYS[0]))
    async with app_client(app_with(api_key=KEYS, metrics_public=True)) as client:
        public = await client.get("/metrics")
        still_keyed = await client.post("/v1/score", json=ROUTES[0][2])
    assert open_routes == [200, 200]
    assert metrics_without.status_code == 401 and metrics_with.status_code == 200
    assert "codescaler_requests_total" in metrics_with.text
    assert public.status_code == 200 and still_keyed.status_code == 401


async def test_without_keys_the_service_is_open() -> None:
    async with app_client(app_with()) as client:
        statuses = [(await call(client, method, path, body, {})).status_code for method, path, body in ROUTES]
        statuses.append((await client.get("/metrics")).status_code)
    assert statuses == [200] * 5


async def test_keys_from_a_file_and_the_flag_are_all_accepted(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("\nfile-key-1\n  file-key-2  \n\n", encoding="utf-8")
    async with app_client(app_with(api_key=["flag-key"], api_key_file=key_file)) as client:
        statuses = [(await client.get("/v1/models", headers=bearer(k))).status_code
                    for k in ("flag-key", "file-key-1", "file-key-2", "file-key-3")]
    assert statuses == [200, 200, 200, 401]


async def test_the_supplied_key_is_compared_with_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping at the first match would tell an attacker, by timing, which key matched."""
    import hmac

    from service import auth

    compared: list[int] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(1)
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    async with app_client(app_with(api_key=["k1", "k2", "k3"])) as client:
        r = await client.get("/v1/models", headers=bearer("k1"))
    assert r.status_code == 200 and len(compared) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["--api-key-file", "/nonexistent/keys"], "cannot use the API keys"),
    (["--api-key-file", "EMPTY"], "holds no key"),
    (["--api-key", " "], "empty key"),
    (["--max-length", "4096", "--max-batch-tokens", "2048"], "max_batch_tokens (2048) must be at least max_length"),
])
def test_the_cli_refuses_bad_keys_and_impossible_limits_with_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n  \n", encoding="utf-8")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    # --model names nothing loadable: these must be refused before any model is loaded.
    proc = subprocess.run([sys.executable, "-m", "service", "--model", "/nonexistent/model", *args],
                          cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "cannot load" not in proc.stderr


@pytest.mark.parametrize(("host", "keys", "warned"), [
    ("0.0.0.0", [], True), ("10.1.2.3", [], True), ("::", [], True), ("example.internal", [], True),
    ("127.0.0.1", [], False), ("::1", [], False), ("localhost", [], False), ("0.0.0.0", ["k"], False),
])
def test_serving_beyond_loopback_without_keys_logs_a_warning(
    caplog: pytest.LogCaptureFixture, host: str, keys: list[str], warned: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="codescaler.main"):
        check_keys_or_exit(Settings(model="fake", host=host, api_key=keys))
    assert ("no API key configured" in caplog.text) is warned


async def test_cors_headers_only_for_configured_origins() -> None:
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    async with app_client(app_with()) as client:
        closed = await client.options("/v1/score", headers=preflight)
        closed_get = await client.get("/health", headers={"Origin": "https://ui.example"})
    async with app_client(app_with(cors_origins=["https://ui.example"])) as client:
        allowed = await client.options("/v1/score", headers=preflight)
        other = await client.options("/v1/score", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in closed.headers
    assert "access-control-allow-origin" not in closed_get.headers
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    assert "access-control-allow-origin" not in other.headers


# --- limits, through a real server over loopback -------------------------------------------

LIMITS = {"max_body_bytes": 2048, "max_items_per_request": 3, "max_chars_per_field": 100}


@pytest.fixture(scope="module")
def limited() -> Iterator[tuple[str, FaultScorer]]:
    scorer = FaultScorer()
    with serve_in_thread(app_with(scorer, **LIMITS)) as url:
        yield url, scorer


def _items(n: int, chars: int = 1) -> dict[str, object]:
    return {"items": [{"problem": "p" * chars, "response": CODE} for _ in range(n)]}


@pytest.mark.slow
@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/score", _items(3), 200),
    ("/v1/score", _items(4), 413),
    ("/v1/score", _items(1, chars=100), 200),
    ("/v1/score", _items(1, chars=101), 413),
    ("/v1/score", {"items": [{"problem": "p", "response": "x" * 101}]}, 413),
    ("/v1/rank", {"problem": "p", "responses": [CODE] * 4}, 413),
    ("/v1/rank", {"problem": "p" * 101, "responses": [CODE]}, 413),
    ("/get_reward", {"query": [QUERY] * 4}, 413),
    ("/get_reward", {"query": ["q" * 101]}, 413),
    ("/get_reward", {"query": ["q"], "prompts": ["p" * 101]}, 413),
])
def test_item_and_character_limits_refuse_before_tokenizing(
    limited: tuple[str, FaultScorer], path: str, body: dict[str, object], expected: int
) -> None:
    url, scorer = limited
    before = scorer.encoded
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code == expected, r.text
    if expected == 413:
        assert r.json()["error"]["code"] == "payload_too_large"
        assert scorer.encoded == before  # refused before any tokenization


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True])
def test_body_limit_holds_for_declared_and_chunked_bodies(limited: tuple[str, FaultScorer], chunked: bool) -> None:
    url, scorer = limited
    body = b'{"items": [{"problem": "p", "response": "```python\\nx = 1\\n```"}]}'
    # JSON allows whitespace: pad to sizes around the limit without breaking the field limits.
    small, large = body + b" " * (2048 - len(body)), body + b" " * (2049 - len(body))

    def send(body: bytes) -> httpx.Response:
        content: bytes | Iterator[bytes] = body
        if chunked:  # no Content-Length: httpx streams it with Transfer-Encoding: chunked
            content = iter([body[i:i + 256] for i in range(0, len(body), 256)])
        return httpx.post(f"{url}/v1/score", content=content, headers={"content-type": "application/json"}, timeout=30)

    before = scorer.encoded
    too_large = send(large)
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "payload_too_large"
    assert scorer.encoded == before
    fits = send(small)
    assert fits.status_code == 200, fits.text
    assert fits.json()["results"][0]["valid"] and scorer.encoded == before + 1
