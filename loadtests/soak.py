"""Bounded loopback soak: mixed traffic at about 80% of capacity; errors and memory growth.

1. Start ``codescaler-serve`` (``--server-args``, default the tiny random model) on a free
   loopback port, or use a running one (``--url`` and ``--pid``).
2. Measure capacity: closed-loop traffic from ``--concurrency`` clients for
   ``--capacity-seconds``; the target is ``--load`` (0.8) of the requests per second
   seen, unless ``--rate`` fixes it.
3. Soak: open-loop arrivals at the target rate for ``--duration`` seconds; the server's
   resident memory (VmRSS from /proc/<pid>/status) is sampled every second.
4. Report: requests by kind and status, errors, latency, and RSS growth from the end of
   ``--warmup`` to the end. Exit 1 on any error or growth over ``--max-growth-mb``.

The traffic mix and what counts as an error are ``loadtests/soak_traffic.py``'s; a
request not answered within two minutes is an error too. Arrivals delayed because the
server fell behind are counted and reported, not judged (see ``open_loop``).

    python loadtests/soak.py --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.soak_traffic import Tally, one_request

ROOT = Path(__file__).resolve().parent.parent
async def closed_loop(url: str, headers: dict[str, str], concurrency: int, seconds: float, seed: int) -> float:
    """Requests per second that ``concurrency`` back-to-back clients get (the capacity)."""
    tally = Tally()
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        rng = random.Random(seed + i)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            while time.monotonic() < stop_at:
                await one_request(client, rng, tally)
                done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    if tally.errors:
        raise SystemExit(f"soak: errors while measuring capacity: {tally.errors[:5]}")
    return done / (time.monotonic() - started)


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def open_loop(url: str, headers: dict[str, str], pid: int, rate: float, seconds: float,
                    max_in_flight: int, seed: int) -> tuple[Tally, list[tuple[float, float]]]:
    """Arrivals every 1/rate s for ``seconds``; RSS sampled every second.

    With ``max_in_flight`` requests open, the next arrival waits for one to finish
    (a client pool's back-pressure, not an error), and a schedule more than a second
    behind is not caught up in a burst: both are counted as late arrivals, and the
    report shows the rate achieved. On a machine shared with other work the server's
    capacity can drop below the measured one; then the rate drops, not the verdict.
    """
    tally, rss = Tally(), []
    rng = random.Random(seed)
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        start = time.monotonic()
        next_sample = next_due = start
        while (now := time.monotonic()) < start + seconds:
            if now >= next_sample:
                rss.append((now - start, rss_mb(pid)))
                next_sample += 1.0
                if len(rss) % 60 == 0:  # a progress line a minute, for long runs watched from a log
                    errors = sum(n for (kind, _), n in tally.statuses.items() if kind == "error")
                    print(f"  {now - start:5.0f} s: {tally.sent} sent, {len(in_flight)} in flight, "
                          f"{tally.late} late, {errors} errors, RSS {rss[-1][1]:.1f} MB", flush=True)
            if now < next_due:
                await asyncio.sleep(min(next_due - now, max(0.0, next_sample - now)))
                continue
            if len(in_flight) >= max_in_flight:
                await asyncio.wait(in_flight, timeout=max(0.01, next_sample - now),
                                   return_when=asyncio.FIRST_COMPLETED)
                continue
            task = asyncio.create_task(one_request(client, random.Random(rng.random()), tally))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            tally.sent += 1
            next_due += 1.0 / rate
            if now - next_due > 1.0:  # more than a second behind: skip ahead instead of bursting
                tally.late += int((now - next_due) * rate)
                next_due = now
        if in_flight:
            await asyncio.wait(in_flight, timeout=180)
        rss.append((time.monotonic() - start, rss_mb(pid)))
    return tally, rss


def start_server(server_args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """codescaler-serve on a free loopback port, output to ``log``; wait for /ready."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           *server_args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"soak: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("soak: the server did not become ready")


def report(tally: Tally, rss: list[tuple[float, float]], args: argparse.Namespace, rate: float) -> dict[str, object]:
    """The figures, printed for people and returned for the exit decision."""
    warm = [mb for t, mb in rss if t >= args.warmup]
    baseline, final = (warm[0], warm[-1]) if warm else (rss[0][1], rss[-1][1])
    lat = sorted(tally.latencies)
    figures: dict[str, object] = {
        "duration_s": args.duration, "target_rate_rps": round(rate, 2),
        "achieved_rate_rps": round(tally.sent / args.duration, 2), "late_arrivals": tally.late,
        "requests": sum(n for (kind, _), n in tally.statuses.items() if kind != "error"),
        "errors": sum(n for (kind, _), n in tally.statuses.items() if kind == "error"),
        "by_kind_status": {f"{k} {s}": n for (k, s), n in sorted(tally.statuses.items())},
        "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
        "latency_p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1) if lat else None,
        "rss_start_mb": round(rss[0][1], 1), "rss_after_warmup_mb": round(baseline, 1),
        "rss_end_mb": round(final, 1), "rss_peak_mb": round(max(mb for _, mb in rss), 1),
        "rss_growth_mb": round(final - baseline, 1),
        "rss_median_last_minute_mb": round(statistics.median(mb for t, mb in rss if t >= rss[-1][0] - 60), 1),
    }
    for line in tally.errors[:20]:
        print(f"  error: {line}")
    print(json.dumps(figures, indent=2))
    return figures


async def soak(args: argparse.Namespace, url: str, pid: int) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rate = args.rate
    if rate is None:
        capacity = await closed_loop(url, headers, args.concurrency, args.capacity_seconds, args.seed)
        rate = capacity * args.load
        print(f"capacity {capacity:.1f} req/s with {args.concurrency} clients; soaking at {rate:.1f} req/s")
    tally, rss = await open_loop(url, headers, pid, rate, args.duration, args.max_in_flight, args.seed + 1000)
    figures = report(tally, rss, args, rate)
    failed = figures["errors"] or float(figures["rss_growth_mb"]) > args.max_growth_mb  # type: ignore[arg-type]
    print("SOAK FAILED" if failed else "SOAK PASSED")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="Soak seconds at the target rate.")
    parser.add_argument("--warmup", type=float, default=None, help="Seconds before the RSS baseline "
                        "(default: a quarter of the duration, at most 60).")
    parser.add_argument("--rate", type=float, default=None, help="Requests per second (skips measuring).")
    parser.add_argument("--load", type=float, default=0.8, help="Share of measured capacity to soak at.")
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=8, help="Clients when measuring capacity.")
    parser.add_argument("--max-in-flight", type=int, default=128, help="Open requests at most (a client pool).")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=os.environ.get("CODESCALER_SOAK_API_KEY"))
    parser.add_argument("--url", help="A running server (needs --pid); default: start one.")
    parser.add_argument("--pid", type=int, help="Process id of the server at --url, for its RSS.")
    parser.add_argument("--server-args", default="--model tiny-random", help="Flags for the started server.")
    parser.add_argument("--server-log", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 4)
    if args.url:
        if args.pid is None:
            parser.error("--url needs --pid (the process whose memory is watched)")
        return asyncio.run(soak(args, args.url, args.pid))
    log = args.server_log or Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    proc, url = start_server(shlex.split(args.server_args), log)
    print(f"server pid {proc.pid} at {url}; log {log}")
    try:
        code = asyncio.run(soak(args, url, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        print(f"soak: the server exited with {proc.returncode} after SIGTERM")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
