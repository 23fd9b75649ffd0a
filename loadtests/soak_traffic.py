"""The soak's traffic: one random request of a weighted kind, sent and judged.

The mix: /v1/score (1-8 items), /v1/rank (2-6 responses), /get_reward (1-8 queries),
with invalid code among them; probes (/ready, /health, /metrics); requests that must be
refused (422, 413); and clients that give up mid-request (their items are withdrawn).
An error is any other status, a transport failure or a malformed 200.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

GOOD = "Here is my solution.\n```python\ndef solve(n):\n    return sum(range({k}))\n\nprint(solve({k}))\n```\n"
BAD = ["No code, just words about {k}.", "```python\ndef broken({k}:\n    return\n```"]


@dataclass
class Tally:
    """What happened, by request kind."""

    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    late: int = 0  # arrivals the schedule skipped because the server was behind

    def error(self, message: str) -> None:
        if len(self.errors) < 1000:  # keep the first ones; the count is what matters
            self.errors.append(message)
        self.statuses[("error", message.split(":")[0])] += 1


def response_text(rng: random.Random) -> str:
    k = rng.randint(1, 10_000)
    return (BAD[rng.randrange(2)] if rng.random() < 0.2 else GOOD).format(k=k) * rng.choice([1, 1, 2, 8])


def problem_text(rng: random.Random) -> str:
    return f"Problem {rng.randrange(64)}: print the sum of the first n integers. " * rng.choice([1, 4, 16])


def request_for(kind: str, rng: random.Random) -> tuple[str, str, object | None, set[int], int | None]:
    """(method, path, json body, accepted statuses, items expected in a 200) for one request."""
    if kind == "score":
        n = rng.randint(1, 8)
        problem = problem_text(rng)  # shared by the request's items, as a GRPO group is
        return "POST", "/v1/score", {"items": [{"problem": problem, "response": response_text(rng)}
                                               for _ in range(n)]}, {200}, n
    if kind == "rank":
        n = rng.randint(2, 6)
        return "POST", "/v1/rank", {"problem": problem_text(rng), "responses": [response_text(rng)
                                                                               for _ in range(n)]}, {200}, n
    if kind == "reward":
        n = rng.randint(1, 8)
        queries = [f"<|im_start|>user\n{problem_text(rng)}<|im_end|>\n<|im_start|>assistant\n{response_text(rng)}"
                   for _ in range(n)]
        return "POST", "/get_reward", {"query": queries}, {200}, n
    if kind == "probe":
        return "GET", rng.choice(["/ready", "/health", "/metrics"]), None, {200}, None
    if kind == "invalid":
        return "POST", "/v1/score", {"items": [{"problem": "p"}]}, {422}, None
    return "POST", "/v1/score", {"items": [{"problem": "p" * 500_000, "response": "r"}]}, {413}, None  # too_large


KINDS = ["score"] * 45 + ["rank"] * 20 + ["reward"] * 20 + ["probe"] * 8 + ["invalid"] * 3 \
    + ["too_large"] * 2 + ["abandon"] * 2


async def one_request(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    """Send one request of a random kind and judge its answer."""
    kind = rng.choice(KINDS)
    if kind == "abandon":  # a client that gives up: cancelled while the server works on it
        method, path, body, _, _ = request_for("score", rng)
        task = asyncio.ensure_future(client.request(method, path, json=body))
        await asyncio.sleep(rng.uniform(0.0, 0.02))
        task.cancel()
        try:
            await task
            tally.statuses[("abandon", "answered first")] += 1
        except asyncio.CancelledError:
            tally.statuses[("abandon", "gave up")] += 1
        except httpx.HTTPError as exc:
            tally.error(f"abandon transport: {exc!r}")
        return
    method, path, body, accepted, items = request_for(kind, rng)
    started = time.perf_counter()
    try:
        r = await client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        tally.error(f"{kind} transport: {exc!r}")
        return
    tally.statuses[(kind, str(r.status_code))] += 1
    if r.status_code not in accepted:
        tally.error(f"{kind} status: {r.status_code} {r.text[:200]}")
        return
    if items is not None:
        tally.latencies.append(time.perf_counter() - started)
        payload = r.json()
        got = len(payload["rewards"]) if kind == "reward" else len(payload["results"])
        if got != items:
            tally.error(f"{kind} malformed: {got} results for {items} items")
