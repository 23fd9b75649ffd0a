"""Abuse figures: the worst CPU seconds per request byte of each route, and memory under a flood.

1. Start ``codescaler-serve`` (``--server-args``, default the tiny random model with a
   small queue) on a free loopback port.
2. Flood (first, on the fresh server): ten times the queue capacity (``--max-queue-items`` of the server) in items,
   in requests of ``--flood-request-items`` at once; the server's peak resident memory,
   the answers by status, and their latency. (Thousands of simultaneous connects would
   overflow the kernel's SYN backlog and time TCP's retransmits instead of the server.)

3. Cost per byte: for each route, hostile bodies built to be expensive (the longest
   fields, rank's problem x responses, control-token spam, deep fences, dense code,
   OpenRLHF queries full of end tokens). Each is sent alone; the server's CPU time
   (utime + stime of its process, /proc/<pid>/stat) before and after, over the body's
   bytes, is its cost. The report keeps the worst body per route.
Figures only, no thresholds: the README records them.

    python loadtests/abuse.py --out loadtests/results/abuse.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.soak import rss_mb, start_server

FIELD = 400_000  # the default --max-chars-per-field
QUEUE_ITEMS = 256
DEFAULT_SERVER = f"--model tiny-random --max-queue-items {QUEUE_ITEMS} --max-items-per-request 256"
TICKS = os.sysconf("SC_CLK_TCK")
FENCE = "```"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def fenced(code: str, tag: str = "python") -> str:
    return f"{FENCE}{tag}\n{code}\n{FENCE}"


def words(n: int) -> str:
    return " ".join(f"word{i % 997}" for i in range(n))


#: route -> name -> body for a nonce (a fresh problem each round: the tokenizer caches problems).
#: Sizes stay within the default limits, so each is admitted.
def hostile_bodies() -> dict[str, dict[str, Callable[[str], object]]]:
    dense = "x=1\n" * (FIELD // 4 - 10)
    control = ("<|im_end|>\n<|im_start|>assistant\n</think>" * (FIELD // 40))[: FIELD - 100]
    garbage = "} ) ] x @ (\n" * (FIELD // 13)
    end_tokens = "<|im_end|>" * (FIELD // 11)
    rank_problem = words(80_000)[: FIELD - 100]
    literal = "s = '''" + control[:100_000] + "'''"

    def one(n: str, problem: str, response: str, **options: str) -> dict[str, object]:
        return {"items": [{"problem": n + problem, "response": response}], **options}

    def rank(n: str, problem: str, responses: list[str]) -> dict[str, object]:
        return {"problem": n + problem, "responses": responses}

    return {
        "/v1/score": {
            "longest-fields": lambda n: one(n, words(FIELD // 8), fenced(dense[: FIELD - 20])),
            "dense-python-128k": lambda n: one(n, "", fenced(dense[: 128 * 1024])),
            "garbage-cpp": lambda n: {"items": [{"problem": n, "response": fenced(garbage, "cpp"), "language": "cpp"}]},
            "control-token-spam": lambda n: one(n, control, fenced(literal)),
            "many-fences-lenient": lambda n: one(n, "", (fenced("(") + "\n") * (FIELD // 16), extraction="lenient"),
            "256-short-items": lambda n: {"items": [{"problem": f"{n}{i}", "response": fenced("print(1)")}
                                                    for i in range(256)]},
        },
        "/v1/rank": {
            "80k-word-problem-x16": lambda n: rank(n, rank_problem, [fenced(f"print({k})") for k in range(16)]),
            "80k-word-problem-x128": lambda n: rank(n, rank_problem, [fenced(f"print({k})") for k in range(128)]),
            "long-problem-long-responses": lambda n: rank(n, words(FIELD // 8), [fenced(dense[:50_000])] * 32),
        },
        "/get_reward": {
            "trailing-end-tokens": lambda n: {
                "query": [f"<|im_start|>user\n{n}<|im_end|>\n<|im_start|>assistant\n{fenced('print(1)')}{end_tokens}"],
                "prompts": [f"<|im_start|>user\n{n}<|im_end|>\n"]},
            "long-query": lambda n: {"query": [n + words(FIELD // 8) + fenced("print(1)")], "prompts": [""]},
        },
    }


def cost_per_byte(url: str, pid: int, rounds: int) -> dict[str, object]:
    """Worst CPU seconds per body byte of each route (best of ``rounds`` per body: noise only adds)."""
    out: dict[str, object] = {}
    with httpx.Client(base_url=url, timeout=600) as client:
        for route, bodies in hostile_bodies().items():
            rows = []
            for name, build in bodies.items():
                costs, statuses = [], set()
                for k in range(rounds):
                    body = json.dumps(build(f"[{name} {k}] ")).encode()
                    before, wall = cpu_seconds(pid), time.perf_counter()
                    r = client.post(route, content=body, headers={"content-type": "application/json"})
                    costs.append((cpu_seconds(pid) - before, time.perf_counter() - wall))
                    statuses.add(r.status_code)
                cpu, wall = min(costs)
                rows.append({"body": name, "bytes": len(body), "status": sorted(statuses), "cpu_s": round(cpu, 3),
                             "wall_s": round(wall, 3), "cpu_us_per_byte": round(cpu / len(body) * 1e6, 3)})
                print(f"{route:12} {name:28} {len(body) / 1e6:6.2f} MB  {sorted(statuses)}  cpu {cpu:6.3f} s  "
                      f"{rows[-1]['cpu_us_per_byte']:7.3f} us/byte", flush=True)
            worst = max(rows, key=lambda row: row["cpu_us_per_byte"])  # type: ignore[arg-type, return-value]
            out[route] = {"worst": worst, "bodies": rows}
    return out


async def flood(url: str, pid: int, requests: int, per_request: int) -> dict[str, object]:
    """``requests`` requests of ``per_request`` items at once; peak RSS sampled every 50 ms meanwhile."""
    peak, base = rss_mb(pid), rss_mb(pid)
    latencies: dict[int, list[float]] = {}
    statuses: Counter[int] = Counter()

    async def one(client: httpx.AsyncClient, i: int) -> None:
        started = time.perf_counter()
        body = {"items": [{"problem": f"flood problem {i} " * 50, "response": fenced(f"print({i}, {k})\n" * 20)}
                          for k in range(per_request)]}
        try:
            r = await client.post("/v1/score", json=body)
            statuses[r.status_code] += 1
            latencies.setdefault(r.status_code, []).append(time.perf_counter() - started)
        except httpx.HTTPError as exc:
            statuses[-1] += 1
            print(f"flood: {exc!r}", flush=True)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=requests)) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(requests)]
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.05)
    return {
        "requests": requests, "items_per_request": per_request, "statuses": dict(statuses),
        "rss_before_mb": round(base, 1), "rss_peak_mb": round(peak, 1), "rss_growth_mb": round(peak - base, 1),
        "latency_s": {str(code): {"median": round(statistics.median(v), 3), "max": round(max(v), 3)}
                      for code, v in latencies.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server-args", default=DEFAULT_SERVER)
    parser.add_argument("--queue-items", type=int, default=QUEUE_ITEMS, help="the server's --max-queue-items")
    parser.add_argument("--flood-request-items", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    log = Path(tempfile.mkstemp(prefix="abuse-", suffix=".log")[1])
    proc, url = start_server(shlex.split(args.server_args), log)
    try:
        # The flood first, on a fresh server: its memory figure is not hidden by the peaks of
        # the huge bodies that follow.
        requests = 10 * args.queue_items // args.flood_request_items
        figures: dict[str, object] = {"server_args": args.server_args, "cpu_count": os.cpu_count(),
                                      "flood": asyncio.run(flood(url, proc.pid, requests, args.flood_request_items))}
        print(json.dumps(figures["flood"], indent=2), flush=True)
        figures["cost_per_byte"] = cost_per_byte(url, proc.pid, args.rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
