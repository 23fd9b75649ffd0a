"""Each trainer adapter of the installed client package, loaded and called the way its
framework does, against the live tiny-model server: its rewards equal what POST /v1/score gives for the same pairs.

The argument shapes follow the frameworks' own call sites: OpenRLHF loads the file with
``spec_from_file_location`` and calls ``reward_func(queries, prompts, labels)`` with the
decoded prompt-plus-response texts; veRL loads ``custom_reward_function.path`` the same
way and passes keywords (plus ``reward_router_address`` etc. in its reward loop, and
``extra_info`` from parquet, where lists arrive as numpy arrays); TRL's GRPOTrainer
passes ``prompts``, ``completions``, ``completion_ids``, dataset columns and
``trainer_state`` as keywords.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

import codescaler_client.integrations
from codescaler_client.integrations.trl import CodeScalerReward

pytestmark = pytest.mark.slow

PROBLEMS = ["Write a Python function add(a, b) that returns a + b.",
            "Write a Python function rev(s) that reverses the string s."]
RESPONSES = [
    "<think>\nEasy.\n</think>\n\n```python\ndef add(a, b):\n    return a + b\n```",
    "I would rather not write code.",
    "```python\ndef rev(s):\n    return s[::-1]\n```",
    "```python\ndef rev(s:\n    return s\n```",
]
PAIRS = [(p, r) for p in PROBLEMS for r in RESPONSES]
INTEGRATIONS = Path(codescaler_client.integrations.__file__).parent  # the files a trainer is pointed at


@pytest.fixture(scope="module")
def expected(live_server: str) -> list[float]:
    """The rewards /v1/score gives for PAIRS: what every adapter must reproduce."""
    items = [{"problem": p, "response": r} for p, r in PAIRS]
    results = httpx.post(f"{live_server}/v1/score", json={"items": items}, timeout=60).json()["results"]
    assert any(r["valid"] for r in results) and not all(r["valid"] for r in results)
    return [r["reward"] for r in results]


@pytest.fixture
def service_env(live_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The environment a trainer process would have."""
    monkeypatch.setenv("CODESCALER_URL", live_server)
    monkeypatch.delenv("CODESCALER_API_KEY", raising=False)
    return live_server


def load_like_a_framework(filename: str, module_name: str) -> ModuleType:
    """How OpenRLHF ("reward_func") and veRL ("custom_module") load a reward file by path."""
    spec = importlib.util.spec_from_file_location(module_name, INTEGRATIONS / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- OpenRLHF
def chatml(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_openrlhf_reward_func_one_sample_per_call(service_env: str, expected: list[float], tiny_dir: Path) -> None:
    tokenizer = chatml(tiny_dir)
    reward_func = load_like_a_framework("openrlhf.py", "reward_func").reward_func
    got = []
    for problem, response in PAIRS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                               add_generation_prompt=True)
        query = prompt + response + "<|im_end|>"  # decoded with special tokens kept
        out = reward_func([query], [prompt], [None])
        assert set(out) == {"rewards", "scores", "extra_logs"}
        assert out["rewards"].shape == (1,) and str(out["rewards"].dtype) == "torch.float32"
        assert 0.0 <= float(out["scores"][0]) <= 1.0
        assert set(out["extra_logs"]) == {"valid", "raw_score"}
        got.append(float(out["rewards"][0]))
    assert got == pytest.approx(expected, abs=1e-5)


def test_openrlhf_reward_func_padded_micro_batch(service_env: str, expected: list[float], tiny_dir: Path) -> None:
    tokenizer = chatml(tiny_dir)
    reward_func = load_like_a_framework("openrlhf.py", "reward_func").reward_func
    prompts, queries = [], []
    for i, (problem, response) in enumerate(PAIRS):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                               add_generation_prompt=True)
        prompts.append(prompt)  # older releases batch-decode padded sequences: pads on both sides
        queries.append("<|endoftext|>" * (i % 3) + prompt + response + "<|im_end|>" + "<|endoftext|>" * 2)
    out = reward_func(queries, prompts, ["label"] * len(queries))
    assert out["rewards"].tolist() == pytest.approx(expected, abs=1e-5)
    valid = out["extra_logs"]["valid"].tolist()
    assert [s > 0 for s in out["scores"].tolist()] == [v == 1.0 for v in valid]


# --------------------------------------------------------------------------------- veRL
def verl_function(name: str) -> Any:
    """``custom_reward_function.path`` loaded as "custom_module", then ``.name`` looked up."""
    return getattr(load_like_a_framework("verl.py", "custom_module"), name)


def verl_extra_info(problem: str, index: int, style: str) -> dict[str, Any]:
    info: dict[str, Any] = {"split": "train", "index": index, "num_turns": None, "rollout_reward_scores": {}}
    if style == "prompt":
        info["prompt"] = problem
    elif style == "chat":  # parquet gives a list column back as a numpy object array
        info["prompt"] = np.array([{"role": "system", "content": "Answer in Python."},
                                   {"role": "user", "content": problem}], dtype=object)
    else:
        info["question"] = problem
    return info


@pytest.mark.parametrize("style", ["prompt", "chat", "question"])
def test_verl_compute_score(service_env: str, expected: list[float], style: str) -> None:
    compute_score = verl_function("compute_score")
    got = [compute_score(data_source="codescaler", solution_str=response, ground_truth="",
                         extra_info=verl_extra_info(problem, i, style))
           for i, (problem, response) in enumerate(PAIRS)]
    assert [g["score"] for g in got] == pytest.approx(expected, abs=1e-5)
    assert [g["valid"] for g in got] == [1.0 if e > 0 else 0.0 for e in expected]


async def test_verl_compute_score_async_concurrently(service_env: str, expected: list[float]) -> None:
    import asyncio

    compute_score = verl_function("compute_score_async")
    calls = [compute_score(data_source="codescaler", solution_str=response, ground_truth="",
                           extra_info=verl_extra_info(problem, i, "prompt"),
                           reward_router_address=None, reward_model_tokenizer=None)
             for i, (problem, response) in enumerate(PAIRS)]
    got = await asyncio.gather(*calls)
    assert [g["score"] for g in got] == pytest.approx(expected, abs=1e-5)


def test_verl_compute_score_batch_with_reward_kwargs(live_server: str, expected: list[float],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODESCALER_URL", raising=False)  # the URL comes from reward_kwargs here
    compute_score_batch = verl_function("compute_score_batch")
    infos = np.array([{"task": problem} for problem, _ in PAIRS], dtype=object)
    got = compute_score_batch(data_sources=np.array(["codescaler"] * len(PAIRS), dtype=object),
                              solution_strs=[response for _, response in PAIRS], ground_truths=[None] * len(PAIRS),
                              extra_infos=infos, problem_key="task", url=live_server)
    assert [g["score"] for g in got] == pytest.approx(expected, abs=1e-5)


def test_verl_without_a_problem_raises_and_says_where_to_put_it(service_env: str) -> None:
    from codescaler_client.integrations.verl import compute_score

    with pytest.raises(ValueError, match="extra_info"):
        compute_score("codescaler", RESPONSES[0], "", {"split": "train", "index": 0})


# ---------------------------------------------------------------------------------- TRL
def test_trl_plain_format(live_server: str, expected: list[float]) -> None:
    reward = CodeScalerReward(live_server)
    got = reward(prompts=[p for p, _ in PAIRS], completions=[r for _, r in PAIRS],
                 completion_ids=[[1, 2, 3]] * len(PAIRS), ground_truth=["x"] * len(PAIRS), trainer_state=None)
    assert isinstance(got, list) and all(isinstance(v, float) for v in got)
    assert got == pytest.approx(expected, abs=1e-5)
    assert reward.__name__ == "codescaler"
    reward.close()


def test_trl_conversational_format(service_env: str, expected: list[float]) -> None:
    reward = CodeScalerReward(name="code_reward")
    prompts = [[{"role": "system", "content": "You write Python."}, {"role": "user", "content": p}] for p, _ in PAIRS]
    completions = [[{"role": "assistant", "content": r}] for _, r in PAIRS]
    got = reward(prompts=prompts, completions=completions, completion_ids=[[7]] * len(PAIRS),
                 language=["python"] * len(PAIRS))
    assert got == pytest.approx(expected, abs=1e-5)
    assert reward.__name__ == "code_reward"
    reward.close()
