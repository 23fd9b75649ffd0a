"""API tier: the HTTP contract with a fake scorer, in-process (no torch)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.helpers import FakeScorer, app_client

CODE = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
OTHER = "```python\nprint(sum(map(int, input().split())))\n```"


def settings(**overrides: object) -> Settings:
    return Settings(model="fake", **overrides)  # type: ignore[arg-type]


def call(scorer: FakeScorer | None = None, **overrides: object):  # type: ignore[no-untyped-def]
    """An in-process client on a fresh app serving ``scorer``."""
    return app_client(create_app(settings(**overrides), scorer or FakeScorer()))


async def test_score_returns_results_in_input_order_with_usage_and_timing() -> None:
    scorer = FakeScorer()
    items = [{"problem": "add", "response": CODE}, {"problem": "p", "response": "no code here"},
             {"problem": "sum", "response": OTHER}]
    async with call(scorer) as client:
        r = await client.post("/v1/score", json={"items": items, "return_code": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fake"
    assert [x["index"] for x in body["results"]] == [0, 1, 2]
    first, bad, last = body["results"]
    assert first["valid"] and first["extraction"] == {"status": "ok", "language": "python",
                                                       "code": "def add(a, b):\n    return a + b"}
    assert first["score"] == pytest.approx(scorer.expected(scorer.encode("add", first["extraction"]["code"])))
    assert first["reward"] > 0 and last["reward"] > 0
    assert bad == {"index": 1, "reward": 0.0, "score": None, "valid": False,
                   "extraction": {"status": "no_code", "language": "python", "code": None},
                   "truncated": False, "tokens": 0, "error": "no_code", "forged": False}
    assert body["usage"] == {"items": 3, "scored": 2, "tokens": first["tokens"] + last["tokens"]}
    assert float(r.headers["x-queue-time"]) >= 0 and float(r.headers["x-inference-time"]) >= 0
    assert r.headers["x-request-id"]
    assert sum(scorer.calls) == 2  # the invalid item never reached the model


async def test_shaping_none_returns_raw_scores_and_the_invalid_reward() -> None:
    async with call(invalid_reward=-1.0) as client:
        r = await client.post("/v1/score", json={"shaping": "none", "items": [
            {"problem": "a", "response": CODE}, {"problem": "b", "response": "```python\nx = (\n```"}]})
    good, bad = r.json()["results"]
    assert good["reward"] == good["score"]
    assert bad["reward"] == -1.0 and bad["error"] == "syntax_error"


async def test_extraction_policy_and_language_are_honoured() -> None:
    cpp = "```cpp\nint main() { return 0; }\n```"
    async with call() as client:
        r = await client.post("/v1/score", json={"extraction": "lenient", "items": [
            {"problem": "a", "response": cpp, "language": "cpp"},
            {"problem": "a", "response": "plain text, no fences", "language": "python"}]})
        none = await client.post("/v1/score", json={"extraction": "none", "items": [
            {"problem": "a", "response": "plain text, no fences"}]})
    assert [x["extraction"]["status"] for x in r.json()["results"]] == ["ok", "no_code"]
    assert r.json()["results"][0]["extraction"]["language"] == "cpp"
    assert none.json()["results"][0]["valid"] is True


async def test_too_long_items_are_per_item_errors() -> None:
    long_code = "```python\n" + "x = 1\n" * 200 + "```"
    async with call(FakeScorer(max_length=256), max_length=256, max_batch_tokens=1024) as client:
        r = await client.post("/v1/score", json={"items": [
            {"problem": "a", "response": long_code}, {"problem": "a", "response": CODE}]})
    too_long, fine = r.json()["results"]
    assert r.status_code == 200
    assert too_long["error"] == "too_long" and too_long["valid"] is False and too_long["score"] is None
    assert fine["valid"] is True


async def test_rank_orders_by_reward_with_ties_by_index() -> None:
    responses = [CODE, "nothing", OTHER, "nothing either", CODE]
    async with call() as client:
        r = await client.post("/v1/rank", json={"problem": "p", "responses": responses})
        top = await client.post("/v1/rank", json={"problem": "p", "responses": responses, "top_k": 2})
    body = r.json()
    rewards = [x["reward"] for x in body["results"]]
    assert body["ranking"] == sorted(range(5), key=lambda i: (-rewards[i], i))
    assert body["ranking"][-2:] == [1, 3]  # the invalid pair, tied at 0.0, by index
    assert rewards[0] == rewards[4] and body["ranking"].index(0) < body["ranking"].index(4)
    assert body["best"] == body["ranking"][0]
    assert top.json()["ranking"] == body["ranking"][:2]


CHATML_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd two numbers.<|im_end|>\n<|im_start|>assistant\n"


async def test_get_reward_speaks_openrlhf() -> None:
    query = CHATML_PROMPT + CODE + "<|im_end|>\n<|endoftext|>"
    async with call() as client:
        empty = await client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
        r = await client.post("/get_reward", json={"query": [query, CHATML_PROMPT + "no code<|im_end|>"],
                                                   "prompts": [CHATML_PROMPT, CHATML_PROMPT], "labels": [None, "x"]})
        direct = await client.post("/v1/score", json={"items": [{"problem": "Add two numbers.", "response": CODE}]})
        plain = await client.post("/get_reward", json={"query": ["Add two numbers." + CODE],
                                                       "prompts": ["Add two numbers."]})
        no_prompts = await client.post("/get_reward", json={"query": [query]})
    assert empty.status_code == 200 and empty.json() == {"rewards": [], "scores": [],
                                                          "extra_logs": {"valid": [], "raw_score": []}}
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    expected = direct.json()["results"][0]
    assert body["rewards"] == [pytest.approx(expected["reward"]), 0.0]
    assert body["extra_logs"] == {"valid": [1.0, 0.0], "raw_score": [pytest.approx(expected["score"]), 0.0]}
    assert 0.0 < body["scores"][0] < 1.0 and body["scores"][1] == 0.0
    assert plain.json()["rewards"] == [pytest.approx(expected["reward"])]
    assert no_prompts.json()["rewards"] == [pytest.approx(expected["reward"])]


@pytest.mark.parametrize("payload, field", [
    ({"items": []}, "items"),
    ({"items": [{"problem": 1, "response": "x"}]}, "items.0.problem"),
    ({"items": [{"problem": "p"}]}, "items.0.response"),
    ({"items": [{"problem": "p", "response": "r"}], "extraction": "magic"}, "extraction"),
    ({"items": [{"problem": "p", "response": "r"}], "shaping": "sigmoid"}, "shaping"),
    ({"items": [{"problem": "p", "response": "\ud800"}]}, "items.0.response"),
    ({"problem": "p", "responses": []}, "responses"),
])
async def test_bad_requests_get_422_naming_the_field(payload: dict[str, object], field: str) -> None:
    path = "/v1/rank" if "responses" in payload else "/v1/score"
    async with call() as client:
        r = await client.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert field in r.json()["error"]["message"]


async def test_malformed_json_and_mismatched_prompts_are_422() -> None:
    async with call() as client:
        broken = await client.post("/v1/score", content=b'{"items": [', headers={"content-type": "application/json"})
        mismatch = await client.post("/get_reward", json={"query": ["a", "b"], "prompts": ["a"]})
    assert broken.status_code == 422 and mismatch.status_code == 422
    assert "prompts" in mismatch.json()["error"]["message"]


async def test_size_limits_are_413() -> None:
    item = {"problem": "p", "response": CODE}
    async with call(max_items_per_request=3, max_chars_per_field=100, max_body_bytes=4096) as client:
        many = await client.post("/v1/score", json={"items": [item] * 4})
        wide = await client.post("/v1/score", json={"items": [{"problem": "p" * 101, "response": CODE}]})
        big = await client.post("/v1/score", json={"items": [{"problem": "p", "response": "x" * 5000}]})
        rank = await client.post("/v1/rank", json={"problem": "p", "responses": [CODE] * 4})
    assert [r.status_code for r in (many, wide, big, rank)] == [413, 413, 413, 413]
    assert "4 items" in many.json()["error"]["message"]
    assert "items[0].problem" in wide.json()["error"]["message"]


async def test_a_full_queue_answers_503_with_retry_after() -> None:
    scorer = FakeScorer()
    scorer.delay = 0.3
    item = {"problem": "p", "response": CODE}
    async with call(scorer, max_queue_items=2, max_items_per_request=2, max_wait_ms=0) as client:
        first = asyncio.create_task(client.post("/v1/score", json={"items": [item] * 2}))
        await asyncio.sleep(0.05)  # the first batch is now running; the queue refills
        second = asyncio.create_task(client.post("/v1/score", json={"items": [item] * 2}))
        await asyncio.sleep(0.05)
        third = await client.post("/v1/score", json={"items": [item] * 2})
        results = [await first, await second]
    assert [r.status_code for r in results] == [200, 200]
    assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1
    assert third.json()["error"]["code"] == "overloaded"


async def test_ready_health_models_and_metrics() -> None:
    app = create_app(settings(), FakeScorer())
    raw = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with raw:
        assert (await raw.get("/ready")).status_code == 503  # not brought up yet
        assert (await raw.get("/health")).status_code == 200
        assert (await raw.post("/v1/score", json={"items": [{"problem": "p", "response": CODE}]})).status_code == 503
    async with app_client(app) as client:
        assert (await client.get("/ready")).status_code == 200
        models = (await client.get("/v1/models")).json()
        await client.post("/v1/score", json={"items": [{"problem": "p", "response": CODE}]})
        text = (await client.get("/metrics")).text
    assert models["data"][0]["id"] == "fake"
    for name in ("codescaler_requests_total", "codescaler_items_total", "codescaler_request_duration_seconds_bucket",
                 "codescaler_queue_items", "codescaler_batch_items_bucket", "codescaler_batch_tokens_bucket",
                 "codescaler_batch_padding_ratio_bucket", "codescaler_forward_duration_seconds_bucket",
                 "codescaler_reward_bucket", "codescaler_tokens_total"):
        assert f"\n{name}" in text, name
    assert 'codescaler_requests_total{endpoint="/v1/score",status="200"} 1.0' in text
    assert "_created" not in text  # counters and histograms export no creation-time series
