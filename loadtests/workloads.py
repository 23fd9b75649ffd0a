"""Deterministic benchmark traffic: problems and fenced Python answers of chosen token lengths.

Lengths are measured with the model's own tokenizer and chat template, so a
"600-token problem" is 600 tokens as the model reads it. Every answer has exactly
one ```python block that parses, so every item is valid under the paper's
extraction rules and every contender scores exactly the same model inputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

WORDS = ["array", "integer", "string", "return", "value", "input", "output", "sorted", "distinct", "maximum",
         "minimum", "sum", "prefix", "query", "each", "line", "first", "second", "print", "number", "given",
         "constraints", "example", "note", "index", "element", "positive", "subarray", "length", "operation",
         "modulo", "answer", "test", "case", "graph", "edge", "vertex", "path", "tree"]


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request: its items as (problem, response) pairs, and their model token lengths."""

    items: tuple[tuple[str, str], ...]
    lengths: tuple[int, ...]
    prefix_lengths: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Workload:
    """Requests sent in this order by ``concurrency`` closed-loop clients."""

    name: str
    description: str
    requests: tuple[Request, ...]
    concurrency: int
    unit: int = 1  # consecutive requests that belong together (one problem's group): rounds never split them

    @property
    def items(self) -> int:
        """Items in all requests."""
        return sum(len(r.items) for r in self.requests)

    @property
    def tokens(self) -> int:
        """Model tokens of all items (each item as a full sequence)."""
        return sum(sum(r.lengths) for r in self.requests)

    def rounds(self, count: int) -> list[list[tuple[int, Request]]]:
        """The (index, request) pairs cut into ``count`` consecutive rounds of whole units."""
        units = len(self.requests) // self.unit
        cuts = [round(units * r / count) * self.unit for r in range(count)] + [len(self.requests)]
        indexed = list(enumerate(self.requests))
        return [indexed[a:b] for a, b in pairwise(cuts) if b > a]


Measure = Callable[[str, str], tuple[int, int]]  # (problem, code) -> (tokens, problem-only prefix tokens)


def _grow(make: Callable[[int], str], target: int, count: Callable[[str], int]) -> str:
    """The text from ``make(n)`` with the smallest n whose token count reaches ``target``."""
    low, high = 1, 1
    while count(make(high)) < target:
        low, high = high, high * 2
    while low < high:
        mid = (low + high) // 2
        if count(make(mid)) < target:
            low = mid + 1
        else:
            high = mid
    return make(low)


def problem_text(rng: random.Random, target: int, count: Callable[[str], int]) -> str:
    """A programming-problem-like statement of about ``target`` tokens."""
    words = [rng.choice(WORDS) for _ in range(4 * target)]
    title = f"Problem {rng.randrange(10**6)}: "

    def make(n: int) -> str:
        body = " ".join(words[:n])
        return title + body + ".\nWrite a Python function solve() that reads stdin and prints the answer."

    return _grow(make, target, count)


def code_text(rng: random.Random, target: int, count: Callable[[str], int]) -> str:
    """A valid Python function of about ``target`` tokens."""
    lines = [f"    v{j} = (x * {rng.randrange(1, 97)} + {rng.randrange(100)}) % {rng.randrange(2, 1000)}"
             for j in range(target)]

    def make(n: int) -> str:
        return "def solve(x):\n" + "\n".join(lines[:n]) + f"\n    return v{n - 1}"

    return _grow(make, target, count)


def answer(code: str) -> str:
    """A policy response: prose, one fenced block, prose."""
    return f"Here is my solution.\n```python\n{code}\n```\nIt runs in linear time."


def _counters(measure: Measure) -> tuple[Callable[[str], int], Callable[[str], int]]:
    """Token counters for a problem (its prefix with the template) and for code (its own tokens)."""
    empty = measure("", "")[0]

    def count_problem(text: str) -> int:
        return measure(text, "")[1]

    def count_code(text: str) -> int:
        return measure("", text)[0] - empty

    return count_problem, count_code


def _request(pairs: list[tuple[str, str]], codes: list[str], measure: Measure) -> Request:
    measured = [measure(problem, code) for (problem, _), code in zip(pairs, codes, strict=True)]
    return Request(tuple(pairs), tuple(m[0] for m in measured), tuple(m[1] for m in measured))


def grouped(name: str, description: str, *, groups: int, group_size: int, per_request: int,
            problem_tokens: int, code_tokens: int, concurrency: int, seed: int, measure: Measure) -> Workload:
    """Groups of answers sharing a problem; ``per_request`` answers per request (1 = single-sample)."""
    rng = random.Random(seed)
    count_problem, count_code = _counters(measure)
    requests = []
    for _ in range(groups):
        problem = problem_text(rng, round(problem_tokens * rng.uniform(0.9, 1.1)), count_problem)
        codes = [code_text(rng, round(code_tokens * rng.uniform(0.75, 1.25)), count_code)
                 for _ in range(group_size)]
        for start in range(0, group_size, per_request):
            chunk = codes[start : start + per_request]
            requests.append(_request([(problem, answer(c)) for c in chunk], chunk, measure))
    return Workload(name, description, tuple(requests), concurrency, unit=-(-group_size // per_request))


def mixed(name: str, description: str, *, items: int, problem_range: tuple[int, int],
          code_range: tuple[int, int], concurrency: int, seed: int, measure: Measure) -> Workload:
    """Single-sample requests, each with its own problem; lengths log-uniform in the ranges."""
    rng = random.Random(seed)
    count_problem, count_code = _counters(measure)

    def log_uniform(low: int, high: int) -> int:
        return round(low * (high / low) ** rng.random())

    requests = []
    for _ in range(items):
        problem = problem_text(rng, log_uniform(*problem_range), count_problem)
        code = code_text(rng, log_uniform(*code_range), count_code)
        requests.append(_request([(problem, answer(code))], [code], measure))
    return Workload(name, description, tuple(requests), concurrency)
