"""Chat parsing without torch: end-token stripping (linear, and the same answers as before),
think blocks, rendered chats and message lists."""

from __future__ import annotations

from typing import Any, SupportsIndex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.chat import END_TOKENS, split_chat, split_messages, split_query, strip_end_tokens, without_think

CODE = "```python\nprint(1)\n```"


def quadratic_strip(rest: str) -> str:
    """The loop split_query had before (rstrip and slice per token): the answers to keep."""
    while True:
        trimmed = rest.rstrip()
        token = next((t for t in END_TOKENS if trimmed.endswith(t)), None)
        if token is None:
            return rest
        rest = trimmed[: -len(token)]


class CountingStr(str):
    """A str that adds the length of every string it makes to ``copied`` (slices, strips)."""

    copied = 0

    def __getitem__(self, key: SupportsIndex | slice) -> CountingStr:
        part = CountingStr(str.__getitem__(self, key))
        CountingStr.copied += len(part)
        return part

    def rstrip(self, chars: str | None = None) -> CountingStr:
        part = CountingStr(str.rstrip(self, chars))
        CountingStr.copied += len(part)
        return part


@given(st.lists(st.sampled_from([*END_TOKENS, " ", "\n", "\t", "x", "<|im_end", "|>", "\u3000"]), max_size=30))
def test_strip_end_tokens_answers_as_the_old_loop(parts: list[str]) -> None:
    text = "".join(parts)
    assert strip_end_tokens(text) == quadratic_strip(text)


@pytest.mark.parametrize(("tail", "tokens"), [("<|im_end|>", 100_000), ("<|im_end|>\n", 50_000),
                                              ("<|endoftext|> \n", 30_000)])
def test_a_long_tail_of_end_tokens_is_stripped_with_one_copy(tail: str, tokens: int) -> None:
    """A policy repeating an end token until max_tokens: the old loop copied the whole query per token."""
    query = CountingStr("<|im_start|>user\np<|im_end|>\n<|im_start|>assistant\n" + CODE + tail * tokens)
    CountingStr.copied = 0
    head, response = split_query(query, None)
    assert response == CODE
    assert head == "<|im_start|>user\np<|im_end|>\n"
    assert CountingStr.copied <= 2 * len(query)  # the quadratic loop copies about tokens * len / 2


def test_the_counting_str_catches_the_quadratic_loop() -> None:
    """The copy count above can fail: the old loop, given the same tail, copies far more."""
    CountingStr.copied = 0
    text = CountingStr(CODE + "<|im_end|>" * 2_000)
    assert quadratic_strip(text) == CODE
    assert CountingStr.copied > 100 * len(text)


@pytest.mark.parametrize(("response", "expected"), [
    ("<think>\n\n</think>\n\n" + CODE, CODE),  # what Qwen3's template writes for a turn without reasoning
    ("<think>\nplan: ```python\nx = (\n```\n</think>\n\n" + CODE, CODE),
    ("  <think>a</think>" + CODE, CODE),
    ("<think>\nno end to the thought " + CODE, "<think>\nno end to the thought " + CODE),
    ("text <think>a</think>" + CODE, "text <think>a</think>" + CODE),  # only a leading block is a think block
    (CODE, CODE),
])
def test_a_leading_think_block_is_removed(response: str, expected: str) -> None:
    assert without_think(response) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nR<|im_end|>\n", ("P", "R")),
    ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\nR<|im_end|>", ("P", "R")),
    ("<|im_start|>user\nP1<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nP2<|im_end|>\n"
     "<|im_start|>assistant\nR<|im_end|><|endoftext|>", ("P2", "R")),
    ("<|im_start|>user\nP<|im_end|>\n", ("P", "")),  # no answer yet: an empty response (reward 0)
    ("<|im_start|>user\nP\n\n<|im_end|>\n<|im_start|>assistant\nR\n", ("P\n\n", "R\n")),
    ("no markers at all", None),
    ("<|im_start|>assistant\nR<|im_end|>", None),
])
def test_a_rendered_chat_splits_at_its_last_turns(text: str, expected: tuple[str, str] | None) -> None:
    assert split_chat(text) == expected


@pytest.mark.parametrize(("messages", "expected"), [
    ([{"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}], ("P", "R")),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "P"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "<think>t</think>R"}, {"type": "image_url"}]}],
     ("P", "R")),
    ([{"role": "user", "content": "P1"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "P2"}],
     ("P1", "A")),  # as in a rendered chat: the last assistant turn and the user turn before it
    ([{"role": "user", "content": "P"}], ("P", "")),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "R"}], ("", "R")),
    ([{"role": "system", "content": "S"}], None),
    ([{"role": "assistant", "content": "R"}, {"role": "user", "content": "P"}], None),
])
def test_messages_split_like_a_rendered_chat(messages: list[dict[str, Any]], expected: tuple[str, str] | None) -> None:
    assert split_messages(messages) == expected
