"""Locust traffic of the three ways trainers and samplers call the scorer, on a realistic corpus.

User classes: ``OpenRLHFUser`` (one rollout per /get_reward request, ChatML query and prompt),
``GRPOUser`` (a group of 8 rollouts of one problem per /v1/score request) and ``BestOfNUser``
(16 candidates of one problem per /v1/rank request). Problems are competitive-programming style
statements; responses are prose around one fenced Python program of 20-300 lines, generated
deterministically from templates; about 10% are malformed the ways policies fail (no fence,
two blocks, a syntax error), so the extraction outcome panels show real mixes.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \
        -u 32 -r 8 --run-time 2m --csv loadtests/results/tmp/run --only-summary

A bearer key comes from ``--api-key`` or the CODESCALER_API_KEY variable (first of a comma list).
"""

from __future__ import annotations

import itertools
import random
from functools import lru_cache

from locust import HttpUser, between, events, task

NUM_PROBLEMS = 256
MALFORMED_SHARE = 0.10
MALFORMED_KINDS = ("no_fence", "two_blocks", "syntax_error")
MIN_LINES, MAX_LINES = 20, 300
GROUP_SIZE = 8  # GRPO rollouts per prompt
BEST_OF_N = 16
TIMEOUT_S = 180.0  # OpenRLHF's client timeout

TOPICS = [
    ("Range Sum Queries", "an array of {n} integers and {q} queries; each query gives l and r",
     "the sum of the elements from position l to r inclusive"),
    ("Shortest Path in a Maze", "a grid of {n} rows and {m} columns made of '.' and '#'",
     "the length of the shortest path from the top-left to the bottom-right cell, or -1"),
    ("Merging Schedules", "{n} meetings, each with a start and an end minute",
     "the number of disjoint busy intervals after merging overlapping meetings"),
    ("Counting Coin Change", "a target amount of {n} and {m} coin denominations",
     "the number of ways to make the amount, modulo 1000000007"),
    ("Friend Circles", "{n} people and {q} friendship pairs",
     "the number of groups of people connected through friendships"),
    ("Frequent Words", "a text of {n} words and an integer k",
     "the k most frequent words, ties broken alphabetically"),
    ("Longest Balanced Window", "a string of {n} characters 'a' and 'b'",
     "the length of the longest substring with as many 'a' as 'b'"),
    ("Inversion Count", "a permutation of {n} integers",
     "the number of pairs i < j with p[i] > p[j]"),
]
INTROS = [
    "Let me restate the task: we are given {given}, and we must print {want}.",
    "We need {want}. The input consists of {given}.",
    "The key observation is that {want} can be computed in one pass over {given}.",
    "A brute force over {given} would be too slow for the limits, so I will precompute what we need.",
]
OUTROS = [
    "Each element is processed a constant number of times, so the program runs in O(n log n) time.",
    "This uses O(n) extra memory and easily fits the limits.",
    "I tested it on the sample: it prints the expected output.",
    "Reading all input at once with sys.stdin keeps the I/O fast even for the largest tests.",
]
INSTRUCTION = ("Write a Python 3 program that reads from standard input and writes to standard "
               "output. Put your final solution in a single ```python code block.")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    """--api-key (or CODESCALER_API_KEY): bearer key for a server started with API keys."""
    parser.add_argument("--api-key", env_var="CODESCALER_API_KEY", default="", is_secret=True,
                        help="Bearer key sent with every request (the first of a comma-separated list).")


@lru_cache(maxsize=NUM_PROBLEMS)
def problem(index: int) -> str:
    """The statement of problem ``index``: title, story, input, output, constraints, instruction."""
    rng = random.Random(f"problem:{index}")
    title, given, want = TOPICS[index % len(TOPICS)]
    sizes = {"n": rng.choice([10, 1000, 100000, 200000]), "m": rng.randint(2, 500), "q": rng.randint(1, 10**5)}
    given = given.format(**sizes)
    return "\n\n".join([
        f"# {title} ({index})",
        f"You are given {given}. Print {want}.",
        f"Input\nThe first line contains the sizes, followed by {given}. All values are integers "
        f"between 1 and {rng.choice([10**6, 10**9])} unless stated otherwise.",
        f"Output\nPrint {want}.",
        f"Constraints\nTime limit {rng.choice([1, 2, 3])} s, memory limit {rng.choice([256, 512])} MB.",
        INSTRUCTION,
    ])


def _helper(kind: int, k: int, rng: random.Random) -> list[str]:
    """One helper definition (function or class) in the style of a competitive solution."""
    c, mod = rng.randint(2, 97), rng.randint(2, 13)
    bodies = [
        [f"def build_prefix_{k}(values):", "    prefix = [0] * (len(values) + 1)",
         "    for i, value in enumerate(values):", "        prefix[i + 1] = prefix[i] + value", "    return prefix"],
        [f"def lower_bound_{k}(items, target):", "    lo, hi = 0, len(items)", "    while lo < hi:",
         "        mid = (lo + hi) // 2", "        if items[mid] < target:", "            lo = mid + 1",
         "        else:", "            hi = mid", "    return lo"],
        [f"def bfs_{k}(grid, start):", "    rows, cols = len(grid), len(grid[0])",
         "    dist = [[-1] * cols for _ in range(rows)]", "    dist[start[0]][start[1]] = 0",
         "    queue = deque([start])", "    while queue:", "        r, c = queue.popleft()",
         "        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):", "            nr, nc = r + dr, c + dc",
         "            if 0 <= nr < rows and 0 <= nc < cols and grid[nr][nc] != '#' and dist[nr][nc] < 0:",
         "                dist[nr][nc] = dist[r][c] + 1", "                queue.append((nr, nc))", "    return dist"],
        [f"class DisjointSet{k}:", "    def __init__(self, size):", "        self.parent = list(range(size))",
         "        self.rank = [0] * size", "", "    def find(self, x):", "        while self.parent[x] != x:",
         "            self.parent[x] = self.parent[self.parent[x]]", "            x = self.parent[x]",
         "        return x", "", "    def union(self, a, b):", "        ra, rb = self.find(a), self.find(b)",
         "        if ra == rb:", "            return False", "        if self.rank[ra] < self.rank[rb]:",
         "            ra, rb = rb, ra", "        self.parent[rb] = ra", "        if self.rank[ra] == self.rank[rb]:",
         "            self.rank[ra] += 1", "        return True"],
        [f"def count_ways_{k}(total, coins):", "    @lru_cache(maxsize=None)", "    def go(remaining, index):",
         "        if remaining == 0:", "            return 1", "        if remaining < 0 or index == len(coins):",
         "            return 0", "        return (go(remaining - coins[index], index) + go(remaining, index + 1)) % MOD",
         "    return go(total, 0)"],
        [f"def most_common_{k}(words, k):", "    counts = defaultdict(int)", "    for word in words:",
         "        counts[word.lower()] += 1", "    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))",
         "    return [word for word, _ in ranked[:k]]"],
        [f"def mix_{k}(values):", f"    acc = {c}", "    for index, value in enumerate(values):",
         f"        if value % {mod} == {rng.randint(0, mod - 1)}:", f"            acc = (acc * {c} + value) % MOD",
         "        elif index % 2:", "            acc ^= value", "        else:", f"            acc -= value // {mod}",
         "    return acc"],
        [f"def merge_intervals_{k}(intervals):", "    merged = []", "    for start, end in sorted(intervals):",
         "        if merged and start <= merged[-1][1]:", "            merged[-1][1] = max(merged[-1][1], end)",
         "        else:", "            merged.append([start, end])", "    return merged"],
    ]
    lines = bodies[kind % len(bodies)]
    if rng.random() < 0.5:  # some authors document their helpers
        lines = lines[:1] + [f'    """Helper {k}: see the main loop for how it is used."""'] + lines[1:]
    return lines


def program(rng: random.Random) -> str:
    """A syntactically valid Python program of 20-300 lines (the length drawn from a skewed law)."""
    target = min(MAX_LINES, max(MIN_LINES, int(rng.lognormvariate(4.2, 0.6))))
    head = ["import sys", "from collections import defaultdict, deque", "from functools import lru_cache", "",
            "MOD = 10**9 + 7", ""]
    tail = ["", "def solve():", "    data = sys.stdin.read().split()", "    if not data:", "        return",
            "    n = int(data[0])", "    values = list(map(int, data[1:1 + n]))",
            f"    answer = mix_0(values) % {rng.randint(2, 10**6)}", "    print(answer)", "", "",
            'if __name__ == "__main__":', "    solve()"]
    helpers = _helper(6, 0, rng) + [""]  # solve() calls mix_0
    k = 1
    while True:
        extra = [""] + _helper(rng.randrange(8), k, rng) + [""]
        if len(head) + len(helpers) + len(extra) + len(tail) > target:
            break
        helpers += extra
        k += 1
    return "\n".join(head + helpers + tail)


def _break_syntax(code: str, rng: random.Random) -> str:
    """Drop the colon that ends one compound-statement header: a SyntaxError."""
    lines = code.split("\n")
    headers = [i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "if ", "for ", "while "))]
    i = rng.choice(headers)
    lines[i] = lines[i].rstrip().removesuffix(":")
    return "\n".join(lines)


@lru_cache(maxsize=8192)
def response(problem_index: int, variant: int) -> tuple[str, str]:
    """(kind, text) of one policy response: "ok" or one of MALFORMED_KINDS."""
    rng = random.Random(f"response:{problem_index}:{variant}")
    title, given, want = TOPICS[problem_index % len(TOPICS)]
    given = given.format(n="n", m="m", q="q")
    intro = " ".join(t.format(given=given, want=want) for t in rng.sample(INTROS, 2))
    outro = rng.choice(OUTROS)
    code = program(rng)
    kind = rng.choice(MALFORMED_KINDS) if rng.random() < MALFORMED_SHARE else "ok"
    if kind == "no_fence":
        return kind, f"{intro}\n\n{code}\n\n{outro}"
    if kind == "two_blocks":
        sample = f"```text\n{rng.randint(0, 10**6)}\n```"
        return kind, f"{intro}\n\n```python\n{code}\n```\n\nOn the sample it prints:\n\n{sample}\n\n{outro}"
    if kind == "syntax_error":
        code = _break_syntax(code, rng)
    return kind, f"{intro}\n\n```python\n{code}\n```\n\n{outro}"


class _ScorerUser(HttpUser):
    """Common parts: a deterministic stream of problems per user, the key header, checked POSTs."""

    abstract = True
    host = "http://127.0.0.1:8000"
    wait_time = between(0.0, 0.05)
    _numbers = itertools.count()

    def on_start(self) -> None:
        """Each user draws its own reproducible sequence of problems; sets the bearer key if any."""
        self.rng = random.Random(next(self._numbers))
        key = (getattr(self.environment.parsed_options, "api_key", "") or "").split(",")[0].strip()
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    def post(self, path: str, body: dict[str, object], expected: int, field: str) -> None:
        """POST ``body``; a failure unless 200 with ``expected`` entries in ``field``."""
        with self.client.post(path, json=body, name=path, timeout=TIMEOUT_S, catch_response=True) as reply:
            if reply.status_code != 200:
                reply.failure(f"HTTP {reply.status_code}: {reply.text[:200]}")
                return
            try:
                got = len(reply.json()[field])
            except (ValueError, KeyError, TypeError):
                reply.failure(f"unexpected body: {reply.text[:200]}")
                return
            if got != expected:
                reply.failure(f"{field} has {got} entries, expected {expected}")


class OpenRLHFUser(_ScorerUser):
    """OpenRLHF's remote reward model: one decoded ChatML query (prompt + response) per request."""

    weight = 2

    @task
    def get_reward(self) -> None:
        index = self.rng.randrange(NUM_PROBLEMS)
        _, text = response(index, self.rng.randrange(BEST_OF_N))
        prompt = f"{SYSTEM}<|im_start|>user\n{problem(index)}<|im_end|>\n<|im_start|>assistant\n"
        body = {"query": [f"{prompt}{text}<|im_end|>"], "prompts": [prompt], "labels": [None]}
        self.post("/get_reward", body, 1, "rewards")


class GRPOUser(_ScorerUser):
    """A GRPO trainer's group: the 8 rollouts of one prompt in one /v1/score request."""

    weight = 1

    @task
    def score_group(self) -> None:
        index = self.rng.randrange(NUM_PROBLEMS)
        items = [{"problem": problem(index), "response": response(index, v)[1]} for v in range(GROUP_SIZE)]
        self.post("/v1/score", {"items": items}, GROUP_SIZE, "results")


class BestOfNUser(_ScorerUser):
    """Best-of-N sampling: rank 16 candidates of one problem through /v1/rank."""

    weight = 1

    @task
    def rank_candidates(self) -> None:
        index = self.rng.randrange(NUM_PROBLEMS)
        candidates = [response(index, v)[1] for v in range(BEST_OF_N)]
        self.post("/v1/rank", {"problem": problem(index), "responses": candidates}, BEST_OF_N, "ranking")
