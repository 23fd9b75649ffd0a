"""The model's chat template with the problem and the code placed into it as text.

The authors render the chat and tokenize the whole string, so text inside a problem or
inside a string literal of valid code that spells a control token (``<|im_end|>``,
``<|im_start|>``, ``<think>``, ``</think>`` ...) becomes that control token, and Qwen3's
template moves code before a ``</think>`` into the think block. Here the template is
rendered once with placeholders and cut at its control tokens; the contents are then
tokenized by a copy of the tokenizer that knows no added tokens, so such substrings are
ordinary text, and the pieces' ids are spliced.

Identity with the authors for every input without such substrings holds by
construction: a Hugging Face tokenizer splits text at added tokens first and tokenizes
the spans between them independently, and each span here is exactly one of those spans
(the template's text next to a content, such as ``user\\n``, goes with that content).

The problem's span is tokenized once per distinct problem (a small cache shared by the
items of a /v1/rank request or a GRPO group), so a request's cost is linear in its bytes.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from models.base import TooLong

PROBLEM_SLOT = "@@CODESCALER_PROBLEM@@"
CODE_SLOT = "@@CODESCALER_CODE@@"
#: Spelled as ordinary text even where a tokenizer does not list them as added tokens.
THINK_TAGS = ("<think>", "</think>")
#: Code longer than this many characters per token of room is first tokenized in part: if
#: a prefix already needs more tokens than there is room for, the code is too long, and the
#: rest is never tokenized (real code averages 3-4 characters a token).
PROBE_CHARS_PER_TOKEN = 4
#: Distinct problems kept tokenized; a rank request or a GRPO group shares one entry.
#: Small on purpose: an entry can hold a 400k-character problem and its ~100k ids (~4 MB).
PROBLEM_CACHE_SIZE = 8


@dataclass(frozen=True, slots=True)
class _Piece:
    """Template text around a content, cut at its first and last control token."""

    lead: str  # text before its first control token: joins the content before it
    ids: tuple[int, ...]  # its control tokens and the text between them
    trail: str  # text after its last control token: joins the content after it


@dataclass(frozen=True, slots=True)
class _Problem:
    """The problem's span tokenized once: ids, the range of ids inside the problem itself."""

    ids: tuple[int, ...]
    inside: range
    forged: bool
    truncated: bool


@dataclass(frozen=True, slots=True)
class Encoded:
    """What ChatLayout.encode returns: the ids and the flags of an item."""

    ids: list[int]
    truncated: bool
    forged: bool


def _plain_tokenizer(tokenizer: Any) -> Tokenizer:
    """A copy of ``tokenizer``'s pipeline with no added tokens: everything is ordinary text."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


class ChatLayout:
    """Builds the model's input ids for (problem, code) with both placed as text."""

    def __init__(self, tokenizer: Any) -> None:
        """Cut the template apart; ValueError when its contents are not separated by control tokens."""
        self.tokenizer = tokenizer
        self.plain = _plain_tokenizer(tokenizer)
        added = sorted(set(tokenizer.get_added_vocab()), key=len, reverse=True)
        self.control = re.compile("|".join(re.escape(token) for token in added))
        forgeable = sorted({*added, *THINK_TAGS}, key=len, reverse=True)
        self.forgeries = re.compile("|".join(re.escape(token) for token in forgeable))
        text = self._render(PROBLEM_SLOT, CODE_SLOT)
        head, rest = text.split(PROBLEM_SLOT)
        middle, tail = rest.split(CODE_SLOT)
        # The text before the first and after the last control token of the whole render
        # stands alone (nothing lies beyond it), so it belongs to the head's and tail's ids.
        self.head = self._piece(head, first=True)
        self.middle = self._piece(middle)
        self.tail = self._piece(tail, last=True)
        if not self.head.ids or not self.middle.ids or not self.tail.ids:
            raise ValueError("the chat template does not separate the problem and the code by control tokens")
        self.before_problem, self.after_problem = head, middle + CODE_SLOT + tail
        self.before_code, self.after_code = head + PROBLEM_SLOT + middle, tail
        # A byte-level token string has one character per byte, and a character takes at
        # least one byte: the longest token string bounds the characters one token spells.
        added_ids = set(tokenizer.get_added_vocab().values())
        self.max_token_chars = max(len(t) for t, i in tokenizer.get_vocab().items() if i not in added_ids)
        self.tokenized_chars = 0  # characters handed to a tokenizer (the cost measure of abuse tests)
        self._problems: OrderedDict[tuple[str, int], Future[_Problem]] = OrderedDict()
        self._lock = threading.Lock()

    def _render(self, problem: str, code: str) -> str:
        """The authors' rendering: user then assistant, no system message."""
        chat = [{"role": "user", "content": problem}, {"role": "assistant", "content": code}]
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)

    def _piece(self, text: str, first: bool = False, last: bool = False) -> _Piece:
        """Split template text at its first and last control token (no ids when it has none)."""
        found = list(self.control.finditer(text))
        if not found:
            return _Piece(text, (), "")
        start = 0 if first else found[0].start()
        end = len(text) if last else found[-1].end()
        ids = self.tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        return _Piece(text[:start], tuple(ids), text[end:])

    def forged(self, text: str) -> bool:
        """Whether ``text`` spells a control token or a think tag."""
        return self.forgeries.search(text) is not None

    def _as_placed(self, content: str, problem: bool) -> str:
        """The content as the template places it (it may strip it); verbatim when it is forged.

        A forged content is never rendered: the template would act on its tags.
        """
        if self.forged(content):
            return content
        if problem:
            text, before, after = self._render(content, CODE_SLOT), self.before_problem, self.after_problem
        else:
            text, before, after = self._render(PROBLEM_SLOT, content), self.before_code, self.after_code
        if not (text.startswith(before) and text.endswith(after)):
            return content
        return text[len(before) : len(text) - len(after)]

    def _encode_plain(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of ``text`` with no added tokens recognised."""
        with self._lock:  # preparation threads share the count
            self.tokenized_chars += len(text)
        encoding = self.plain.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def _problem(self, problem: str, max_length: int) -> _Problem:
        """The problem's span, tokenized once per distinct problem (single flight across threads)."""
        key = (problem, max_length)
        with self._lock:
            future = self._problems.get(key)
            owner = future is None
            if owner:
                future = self._problems[key] = Future()
                while len(self._problems) > PROBLEM_CACHE_SIZE:
                    self._problems.popitem(last=False)
            else:
                self._problems.move_to_end(key)
        assert future is not None
        if not owner:
            return future.result()
        try:
            future.set_result(self._tokenize_problem(problem, max_length))
        except BaseException as exc:
            future.set_exception(exc)
            with self._lock:
                self._problems.pop(key, None)
            raise
        return future.result()

    def _tokenize_problem(self, problem: str, max_length: int) -> _Problem:
        """The problem's span (with the template text around it), its middle cut first if it cannot fit."""
        forged = self.forged(problem)
        placed = self._as_placed(problem, problem=True)
        cap = max_length * self.max_token_chars
        truncated = len(placed) > cap
        if truncated:  # it cannot fit: cut its middle before any tokenizer sees it
            placed = placed[: cap // 2] + placed[len(placed) - cap // 2 :]
        lead = self.head.trail
        ids, offsets = self._encode_plain(lead + placed + self.middle.lead)
        start, end = len(lead), len(lead) + len(placed)
        inside = [i for i, (a, b) in enumerate(offsets) if a >= start and b <= end]
        span = range(inside[0], inside[-1] + 1) if inside else range(0)
        return _Problem(tuple(ids), span, forged, truncated)

    def encode(self, problem: str, code: str, max_length: int) -> Encoded:
        """Ids of (problem, code), at most ``max_length``, cut in the middle of the problem when too long."""
        if len(code) > max_length * self.max_token_chars:
            raise TooLong(f"the code has more characters than max_length={max_length} tokens can spell")
        part = self._problem(problem, max_length)
        forged = self.forged(code)
        placed = self._as_placed(code, problem=False)
        fixed = len(self.head.ids) + len(self.middle.ids) + len(self.tail.ids)
        room = max_length - fixed - (len(part.ids) - len(part.inside))  # the code's share, problem cut away
        self._probe(placed, room, max_length)
        code_ids, _ = self._encode_plain(self.middle.trail + placed + self.tail.lead)
        fixed += len(code_ids)
        problem_ids = list(part.ids)
        truncated = part.truncated
        excess = fixed + len(problem_ids) - max_length
        if excess > 0:
            if len(part.inside) < excess:
                raise TooLong(f"the code needs more than max_length={max_length} tokens")
            keep = len(part.inside) - excess
            cut = part.inside.start + (keep + 1) // 2
            problem_ids = problem_ids[:cut] + problem_ids[cut + excess :]
            truncated = True
        ids = [*self.head.ids, *problem_ids, *self.middle.ids, *code_ids, *self.tail.ids]
        return Encoded(ids, truncated, forged or part.forged)

    def _probe(self, code: str, room: int, max_length: int) -> None:
        """TooLong when a prefix of ``code`` alone needs more than ``room`` tokens.

        The prefix ends after a newline followed by a non-space character: no pre-token of
        the tokenizer spans that point (its patterns end a match at a newline before such a
        character), so the prefix's ids are the first ids of the whole and never more.
        """
        limit = PROBE_CHARS_PER_TOKEN * max(room, 1)
        if len(code) <= limit:
            return
        cut = code.rfind("\n", 0, limit)
        while cut > 0 and code[cut + 1].isspace():
            cut = code.rfind("\n", 0, cut)
        if cut <= 0:
            return
        ids, _ = self._encode_plain(self.middle.trail + code[: cut + 1])
        if len(ids) > room:
            raise TooLong(f"the code needs more than max_length={max_length} tokens")
