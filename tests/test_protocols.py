"""vLLM /classify, SGLang /v1/embeddings and /classify, and slime's remote RM, each sent the
way its caller sends it, against the live tiny-model server: every value equals what
POST /v1/score gives for the same (problem, response) pair.

Request shapes follow the callers' source: veRL's reward loop renders the prompt messages
plus the decoded response with the reward model's template and posts
``{"model", "input": str, "use_activation": false}`` (``"activation": false`` in older
releases) to vLLM, reading ``data[-1]["probs"][-1]``, or ``{"model", "input": str}`` to
SGLang's /v1/embeddings, reading ``data[-1]["embedding"][-1]``; slime posts
``{"prompt", "response", "label"}`` and reads ``--reward-key``. Keys and limits on these
routes are checked in-process with a fake scorer (the api tier), as for the native routes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from service.shaping import sigmoid
from tests.helpers import FakeScorer, app_client
from tests.test_integrations import PROBLEMS, RESPONSES  # the pairs the trainer adapters are tested with

PAIRS = [(p, r) for p in PROBLEMS for r in RESPONSES]
MODEL = "LARK-Lab/CodeScaler-8B"  # what a trainer config names; the served model answers
SYSTEM = "You are a careful Python programmer."


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def score(url: str, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    items = [{"problem": p, "response": r} for p, r in pairs]
    reply = httpx.post(f"{url}/v1/score", json={"items": items}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["results"]


@pytest.fixture(scope="module")
def expected(live_server: str) -> list[dict[str, Any]]:
    """/v1/score's results for PAIRS: what every protocol must reproduce."""
    results = score(live_server, PAIRS)
    assert any(r["valid"] for r in results) and not all(r["valid"] for r in results)
    return results


def rm_rendered(tokenizer: Any, problem: str, response: str) -> str:
    """veRL's reward loop: prompt messages plus the decoded response, the reward model's template."""
    chat = [{"role": "user", "content": problem}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)


def policy_prompt(tokenizer: Any, problem: str) -> str:
    """The prompt as a ChatML policy saw it (system message, generation prompt)."""
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def policy_chatml(tokenizer: Any, problem: str, response: str) -> str:
    """Prompt plus decoded response, special tokens kept: what scripts written against vLLM send."""
    return policy_prompt(tokenizer, problem) + response + "<|im_end|>"


def post(url: str, path: str, body: object) -> Any:
    reply = httpx.post(url + path, json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["use_activation", "activation"])
def test_verl_reward_loop_on_vllm_gets_the_score_reward(live_server: str, tokenizer: Any,
                                                        expected: list[dict[str, Any]], flag: str) -> None:
    got = [post(live_server, "/classify", {"model": MODEL, "input": rm_rendered(tokenizer, p, r), flag: False})
           ["data"][-1]["probs"][-1] for p, r in PAIRS]
    assert got == pytest.approx([e["reward"] for e in expected], abs=1e-6)
    assert [x == 0.0 for x in got] == [not e["valid"] for e in expected]


@pytest.mark.slow
def test_verl_reward_loop_on_sglang_gets_the_score_reward(live_server: str, tokenizer: Any,
                                                          expected: list[dict[str, Any]]) -> None:
    got = [post(live_server, "/v1/embeddings", {"model": MODEL, "input": rm_rendered(tokenizer, p, r)})
           ["data"][-1]["embedding"][-1] for p, r in PAIRS]
    assert got == pytest.approx([e["reward"] for e in expected], abs=1e-6)


@pytest.mark.slow
def test_vllm_list_input_in_policy_chatml_with_default_activation(live_server: str, tokenizer: Any,
                                                                  expected: list[dict[str, Any]]) -> None:
    body = post(live_server, "/v1/classify", {"model": MODEL, "input": [policy_chatml(tokenizer, p, r) for p, r in PAIRS]})
    assert re.fullmatch(r"classify-\w+", body["id"]) and body["object"] == "list"
    assert isinstance(body["created"], int) and isinstance(body["model"], str)
    assert [d["index"] for d in body["data"]] == list(range(len(PAIRS)))
    assert all(d["label"] == "LABEL_0" and d["num_classes"] == 1 and len(d["probs"]) == 1 for d in body["data"])
    want = [sigmoid(e["score"]) if e["valid"] else 0.0 for e in expected]
    assert [d["probs"][0] for d in body["data"]] == pytest.approx(want, abs=1e-6)
    tokens = sum(e["tokens"] for e in expected if e["valid"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


@pytest.mark.slow
def test_vllm_chat_form_and_request_id(live_server: str, expected: list[dict[str, Any]]) -> None:
    got = []
    for p, r in PAIRS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p},
                    {"role": "assistant", "content": [{"type": "text", "text": r}]}]
        got.append(post(live_server, "/classify", {"model": MODEL, "messages": messages, "use_activation": False,
                                                   "request_id": "step-7", "priority": 3,
                                                   "truncate_prompt_tokens": 1000}))
    assert [g["data"][0]["probs"][0] for g in got] == pytest.approx([e["reward"] for e in expected], abs=1e-6)
    assert {g["id"] for g in got} == {"classify-step-7"}


@pytest.mark.slow
def test_sglang_native_classify_answers_a_string_and_a_list(live_server: str, tokenizer: Any,
                                                            expected: list[dict[str, Any]]) -> None:
    texts = [rm_rendered(tokenizer, p, r) for p, r in PAIRS]
    one = post(live_server, "/classify", {"text": texts[0]})
    many = post(live_server, "/classify", {"text": texts})
    assert one["embedding"] == pytest.approx([expected[0]["reward"]], abs=1e-6)
    assert one["meta_info"]["valid"] is True and one["meta_info"]["prompt_tokens"] == expected[0]["tokens"]
    assert [m["embedding"][0] for m in many] == pytest.approx([e["reward"] for e in expected], abs=1e-6)
    assert [m["meta_info"]["extraction_status"] for m in many] == [e["extraction"]["status"] for e in expected]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["templated", "raw", "messages"])
def test_slime_remote_rm_reads_the_reward_key(live_server: str, tokenizer: Any,
                                              expected: list[dict[str, Any]], form: str) -> None:
    got = []
    for (p, r), label in zip(PAIRS, range(len(PAIRS)), strict=True):
        prompt: object = {"templated": policy_prompt(tokenizer, p), "raw": p,
                          "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]}[form]
        got.append(post(live_server, "/v1/reward", {"prompt": prompt, "response": r, "label": str(label)}))
    assert [g["reward"] for g in got] == pytest.approx([e["reward"] for e in expected], abs=1e-6)
    assert [(g["valid"], g["extraction_status"]) for g in got] == [(e["valid"], e["extraction"]["status"])
                                                                   for e in expected]
    assert all(g["score"] is None or math.isfinite(g["score"]) for g in got)


@pytest.mark.slow
def test_a_think_block_is_not_read_as_the_answer(live_server: str, tokenizer: Any) -> None:
    """Code the policy sketched while thinking would make the answer two blocks (paper rules: invalid)."""
    answer = RESPONSES[2]
    thought = "<think>\nFirst try:\n```python\ndef rev(s):\n    return s\n```\nNo, reverse it.\n</think>\n\n"
    want = score(live_server, [(PROBLEMS[1], answer)])[0]
    assert score(live_server, [(PROBLEMS[1], thought + answer)])[0]["valid"] is False
    vllm = post(live_server, "/classify", {"input": policy_chatml(tokenizer, PROBLEMS[1], thought + answer),
                                           "use_activation": False})
    slime = post(live_server, "/v1/reward", {"prompt": PROBLEMS[1], "response": thought + answer + "<|im_end|>"})
    assert vllm["data"][0]["probs"][0] == pytest.approx(want["reward"], abs=1e-6)
    assert slime["reward"] == pytest.approx(want["reward"], abs=1e-6)


@pytest.mark.slow
def test_over_long_items_are_answered_per_item_never_4xx(live_server: str, tokenizer: Any,
                                                         expected: list[dict[str, Any]]) -> None:
    """Over the character limit (400,000 by default), or code over --max-length tokens: 0.0 for that item."""
    huge = "```python\n" + "x = 1\n" * 70_000 + "```"  # 420,013 characters
    long_code = "```python\n" + "x = 1\n" * 5_000 + "```"  # fits the characters, not 4096 tokens
    texts = [rm_rendered(tokenizer, *PAIRS[0]), rm_rendered(tokenizer, PROBLEMS[0], huge),
             rm_rendered(tokenizer, PROBLEMS[0], long_code)]
    vllm = post(live_server, "/classify", {"model": MODEL, "input": texts, "use_activation": False})
    assert [d["probs"][0] for d in vllm["data"]] == pytest.approx([expected[0]["reward"], 0.0, 0.0], abs=1e-6)
    errors = [post(live_server, "/v1/reward", {"prompt": PROBLEMS[0], "response": r, "label": None})["error"]
              for r in (huge, long_code)]
    assert errors == ["too_long", "too_long"]


@pytest.mark.slow
@pytest.mark.parametrize(("path", "body"), [
    ("/classify", {"model": MODEL, "input": "Write add. ```python\ndef add(a, b):\n    return a + b\n```"}),
    ("/classify", {"model": MODEL, "input": ["<|im_start|>user\np<|im_end|>\n", "no markers"]}),
    ("/classify", {"text": "no markers"}),
    ("/v1/embeddings", {"model": MODEL, "input": "<|im_start|>assistant\nx = 1<|im_end|>"}),
    ("/classify", {"model": MODEL, "messages": [{"role": "assistant", "content": "x = 1"}]}),
    ("/v1/reward", {"prompt": [{"role": "system", "content": "s"}], "response": "x", "label": None}),
])
def test_an_input_without_a_problem_is_a_400_that_says_so(live_server: str, path: str, body: object) -> None:
    reply = httpx.post(live_server + path, json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "no_problem"
    assert "user" in reply.json()["error"]["message"]


@pytest.mark.slow
def test_empty_lists_get_empty_answers(live_server: str) -> None:
    assert post(live_server, "/classify", {"model": MODEL, "input": []})["data"] == []
    assert post(live_server, "/classify", {"text": []}) == []
    assert post(live_server, "/v1/embeddings", {"model": MODEL, "input": []})["data"] == []


@pytest.mark.slow
def test_openapi_lists_the_routes_and_metrics_count_them_by_endpoint(live_server: str, tokenizer: Any) -> None:
    text = rm_rendered(tokenizer, *PAIRS[0])
    for path, body in [("/classify", {"input": text}), ("/v1/classify", {"input": text}),
                       ("/v1/embeddings", {"input": text}), ("/v1/reward", {"prompt": PROBLEMS[0], "response": "x"})]:
        post(live_server, path, body)
    paths = httpx.get(f"{live_server}/openapi.json").json()["paths"]
    metrics = httpx.get(f"{live_server}/metrics").text
    for path in ("/classify", "/v1/classify", "/v1/embeddings", "/v1/reward"):
        assert "post" in paths[path]
        assert re.search(rf'^codescaler_requests_total{{endpoint="{re.escape(path)}",status="200"}} [1-9]',
                         metrics, re.M), path


# ----------------------------------------------------------------------------- shaping none
@pytest.mark.slow
async def test_shaping_none_gives_the_raw_logit_and_the_invalid_reward(tiny_scorer: Any, model_cache: Path,
                                                                       tokenizer: Any) -> None:
    settings = Settings(model="tiny-random", model_cache_dir=model_cache, shaping="none", invalid_reward=-2.5)
    texts = [rm_rendered(tokenizer, p, r) for p, r in PAIRS]
    async with app_client(create_app(settings, tiny_scorer)) as client:
        results = (await client.post("/v1/score", json={"items": [{"problem": p, "response": r} for p, r in PAIRS]})
                   ).json()["results"]
        off = (await client.post("/classify", json={"input": texts, "use_activation": False})).json()["data"]
        on = (await client.post("/classify", json={"input": texts})).json()["data"]
        sglang = (await client.post("/v1/embeddings", json={"input": texts})).json()["data"]
    raw = [r["score"] if r["valid"] else -2.5 for r in results]
    assert [d["probs"][0] for d in off] == pytest.approx(raw, abs=1e-6)
    assert [d["embedding"][0] for d in sglang] == pytest.approx(raw, abs=1e-6)
    assert [d["probs"][0] for d in on] == pytest.approx(
        [sigmoid(r["score"]) if r["valid"] else -2.5 for r in results], abs=1e-6)


# ----------------------------------------------------------------------------- api tier: auth, limits
CHAT = "<|im_start|>user\nadd one<|im_end|>\n<|im_start|>assistant\n```python\ndef f(x):\n    return x + 1\n```"
ROUTES = [("/classify", {"model": "m", "input": CHAT}), ("/v1/classify", {"messages": [
    {"role": "user", "content": "add one"}, {"role": "assistant", "content": "```python\nx = 1\n```"}]}),
    ("/classify", {"text": [CHAT]}), ("/v1/embeddings", {"input": [CHAT]}),
    ("/v1/reward", {"prompt": "add one", "response": CHAT, "label": None})]


class CountingScorer(FakeScorer):
    """Counts the items it was asked to tokenize."""

    encoded = 0

    def encode(self, problem: str, code: str):  # type: ignore[no-untyped-def]
        self.encoded += 1
        return super().encode(problem, code)


@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_the_new_routes_need_a_key(path: str, body: object) -> None:
    scorer = CountingScorer()
    async with app_client(create_app(Settings(model="fake", api_key=["k"]), scorer)) as client:
        without = await client.post(path, json=body)
        wrong = await client.post(path, json=body, headers={"Authorization": "Bearer x"})
        encoded_after_refusals = scorer.encoded
        right = await client.post(path, json=body, headers={"Authorization": "Bearer k"})
    assert (without.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert encoded_after_refusals == 0 and scorer.encoded == 1


async def test_characters_are_limited_per_item_and_items_per_request() -> None:
    scorer = CountingScorer()
    settings = Settings(model="fake", max_chars_per_field=100, max_items_per_request=3, max_queue_items=3)
    long_chat = CHAT.replace("x + 1", "x + 1" + " " * 100)
    async with app_client(create_app(settings, scorer)) as client:
        mixed = await client.post("/classify", json={"input": [CHAT, long_chat], "use_activation": False})
        slime = await client.post("/v1/reward", json={"prompt": "p" * 101, "response": CHAT})
        too_many = await client.post("/v1/embeddings", json={"input": [CHAT] * 4})
    assert mixed.status_code == 200 and slime.status_code == 200
    first, second = (d["probs"][0] for d in mixed.json()["data"])
    assert first > 0.0 and second == 0.0
    assert slime.json() == {"reward": 0.0, "score": None, "valid": False, "extraction_status": "no_code",
                            "error": "too_long"}
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "payload_too_large"
    assert scorer.encoded == 1  # neither over-long item nor the refused request was tokenized


@pytest.mark.parametrize(("path", "field", "refused", "accepted"), [
    ("/v1/classify", "use_activation", 0.0, False),  # what the schemathesis fuzz found accepted as False
    ("/v1/classify", "activation", "false", False),
    ("/v1/classify", "truncate_prompt_tokens", 1.5, 1.0),  # JSON Schema's integer includes 1.0
    ("/v1/classify", "priority", "0", 0),
    ("/v1/score", "return_code", 1, True),
    ("/v1/rank", "top_k", "2", 2.0),
    ("/v1/rank", "top_k", True, 2),
])
async def test_integers_and_booleans_are_not_coerced(path: str, field: str, refused: object, accepted: object) -> None:
    """The schema says integer or boolean: 0.0, "false", "2" or 1.5 there is a caller's bug, refused with 422."""
    scorer = CountingScorer()
    code = "```python\nprint(1)\n```"
    bodies = {"/v1/classify": {"input": CHAT}, "/v1/score": {"items": [{"problem": "p", "response": code}]},
              "/v1/rank": {"problem": "p", "responses": [code]}}
    async with app_client(create_app(Settings(model="fake"), scorer)) as client:
        no = await client.post(path, json={**bodies[path], field: refused})
        yes = await client.post(path, json={**bodies[path], field: accepted})
    assert no.status_code == 422 and yes.status_code == 200
    assert scorer.encoded == 1  # the refused request was not tokenized
