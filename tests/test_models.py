"""Model tier: the transformers runner on the tiny real model (real tokenizer and template)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from models import tiny
from models.base import ModelLoadError, TooLong
from models.hf import HFScorer, resolve_model_path

TOL = 1e-5
PROBLEMS = [
    "Write a function add(a, b) that returns the sum.",
    "Read n from stdin and print the n-th Fibonacci number. " * 6,
    "Given a list of intervals, merge the overlapping ones and print them sorted.",
]
CODES = [
    "def add(a, b):\n    return a + b",
    "import sys\nn = int(sys.stdin.readline())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nprint(a)",
    "print(1)",
    "def merge(xs):\n    xs.sort()\n    out = []\n    for s, e in xs:\n        if out and s <= out[-1][1]:\n"
    "            out[-1][1] = max(out[-1][1], e)\n        else:\n            out.append([s, e])\n    return out",
]


@pytest.fixture(scope="module")
def reference(tiny_dir: Path):  # type: ignore[no-untyped-def]
    """The authors' pipeline, written out independently of the runner."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()

    def ids(problem: str, code: str) -> list[int]:
        chat = [{"role": "user", "content": problem}, {"role": "assistant", "content": code}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(token_ids: list[int]) -> float:
        with torch.no_grad():
            return model(input_ids=torch.tensor([token_ids])).logits[0, 0].item()

    return tokenizer, model, ids, score


def test_input_is_the_models_own_template_with_empty_think_block(tiny_scorer: HFScorer, reference) -> None:  # type: ignore[no-untyped-def]
    tokenizer, _, ids, _ = reference
    text = tiny_scorer.render("Add.", "x = 1")
    assert text == "<|im_start|>user\nAdd.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nx = 1<|im_end|>\n"
    assert list(tiny_scorer.encode("Add.", "x = 1").input_ids) == ids("Add.", "x = 1")
    assert tiny_scorer.pad_token_id == tiny.PAD_TOKEN_ID == tokenizer.pad_token_id


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("code", CODES)
def test_runner_equals_direct_forward(tiny_scorer: HFScorer, reference, problem: str, code: str) -> None:  # type: ignore[no-untyped-def]
    _, _, ids, score = reference
    item = tiny_scorer.encode(problem, code)
    assert list(item.input_ids) == ids(problem, code) and not item.truncated
    assert tiny_scorer.score([item])[0] == pytest.approx(score(ids(problem, code)), abs=TOL)


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_batch_scores_equal_one_at_a_time(tiny_scorer: HFScorer, prefix_reuse: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(tiny_scorer, "prefix_reuse", prefix_reuse)
    items = [tiny_scorer.encode(p, c) for p in PROBLEMS for c in CODES]
    alone = [tiny_scorer.score([item])[0] for item in items]
    together = tiny_scorer.score(items)
    assert together == pytest.approx(alone, abs=TOL)
    # The model must tell these items apart, or the comparison above proves nothing.
    assert max(alone) - min(alone) > 100 * TOL


@pytest.mark.parametrize("packed", [False, True])
def test_padding_and_packing_do_not_change_a_score(tiny_dir: Path, reference, packed: bool) -> None:  # type: ignore[no-untyped-def]
    _, _, ids, score = reference
    # The padded runner with padding allowed everywhere (one padded batch of all lengths),
    # and the packed runner (no padding at all): both must give each item's lone score.
    scorer = HFScorer(str(tiny_dir), device="cpu", dtype="float32", packed=packed, max_padding=1.0,
                      prefix_reuse=False)
    pairs = [(PROBLEMS[0], CODES[2]), (PROBLEMS[1], CODES[1]), (PROBLEMS[2], CODES[3])]
    items = [scorer.encode(p, c) for p, c in pairs]
    assert len({item.length for item in items}) == 3
    together, stats = scorer.score_with_stats(items)
    assert stats is not None
    if packed:
        assert stats.padding_ratio == 0.0
    else:
        assert stats.padding_ratio > 0.1
    assert together == pytest.approx([score(ids(p, c)) for p, c in pairs], abs=TOL)


def test_truncation_cuts_the_middle_of_the_problem_and_keeps_the_code(tiny_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    tokenizer, _, ids, score = reference
    scorer = HFScorer(str(tiny_dir), device="cpu", dtype="float32", max_length=96)
    problem = "BEGINNING of the task. " + "filler words here " * 60 + "The END of the task."
    code = "def solve():\n    return 42\nprint(solve())"
    item = scorer.encode(problem, code)
    assert item.truncated and item.length == 96
    full = ids(problem, code)
    assert len(full) > 96
    # The code and the closing of the template are intact: the score's token is the original last token.
    tail = len(tokenizer(code + "<|im_end|>\n", add_special_tokens=False)["input_ids"]) + 8
    assert list(item.input_ids[-tail:]) == full[-tail:]
    text = tokenizer.decode(item.input_ids)
    assert text.startswith("<|im_start|>user\nBEGINNING of the task.")
    assert "The END of the task.<|im_end|>" in text
    assert text.endswith(code + "<|im_end|>\n")
    assert scorer.score([item])[0] == pytest.approx(score(list(item.input_ids)), abs=TOL)


def test_code_that_cannot_fit_is_too_long(tiny_dir: Path) -> None:
    scorer = HFScorer(str(tiny_dir), device="cpu", dtype="float32", max_length=64)
    with pytest.raises(TooLong):
        scorer.encode("short problem", "\n".join(f"x{i} = {i}" for i in range(100)))


def test_pickle_only_checkpoint_is_refused(tmp_path: Path, tiny_dir: Path) -> None:
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    shutil.copy(tiny_dir / "config.json", pickle_dir / "config.json")
    torch.save({"w": torch.zeros(1)}, pickle_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        HFScorer(str(pickle_dir), device="cpu")


@pytest.mark.parametrize("model, reason", [
    ("/no/such/model/dir", "no such directory"),
    ("LARK-Lab/CodeScaler-8B", "CodeScaler-8B"),  # offline: the hub cannot be reached
])
def test_unloadable_models_raise_one_clear_error(model: str, reason: str) -> None:
    with pytest.raises(ModelLoadError, match=reason):
        HFScorer(model, device="cpu")


def test_missing_pad_token_is_taken_from_the_tokenizer(tmp_path: Path, tiny_dir: Path) -> None:
    copy = tmp_path / "nopad"
    shutil.copytree(tiny_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.pop("pad_token_id", None)
    (copy / "config.json").write_text(json.dumps(config))
    scorer = HFScorer(str(copy), device="cpu", dtype="float32")
    assert scorer.pad_token_id == tiny.PAD_TOKEN_ID
    items = [scorer.encode("p", "x = 1"), scorer.encode("q", "y = [1, 2, 3]")]
    assert scorer.score(items) == pytest.approx([scorer.score([i])[0] for i in items], abs=TOL)


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = tiny.build(tmp_path / "again")
    first, second = load_file(str(tiny_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert resolve_model_path(str(again), None) == str(again)


def test_info_names_dtype_device_and_template(tiny_scorer: HFScorer) -> None:
    info = tiny_scorer.info()
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["max_length"] == 4096
    assert len(str(info["chat_template_sha256"])) == 16
