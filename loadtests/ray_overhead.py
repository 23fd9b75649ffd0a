"""Measures what the Ray Serve path costs against the single process, side by side on one machine.

Both paths serve the same model with the same Settings and get the same requests from
the same client. Ray runs once per configuration (one replica holding all the CPUs the
single process uses; optionally one replica per CPU); its rounds alternate with rounds
of the single process, so that drift in the machine's load (other jobs) hits both.
Reports items/s and request latency per round, their medians, and the ratios
Ray / single; writes JSON.

Ray starts its workers (replicas, proxy) at niceness 15; the single process gets the same
niceness here, so that on a shared machine both lose the same share to other jobs.

    python loadtests/ray_overhead.py                       # tiny and 25M models, both shapes
    python loadtests/ray_overhead.py --models tiny --rounds 5 --out /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from models import tiny
from service.ray_app import APP_NAME, RayOptions, application
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    """A workload: how many requests, how many items each, how many in flight at once."""

    name: str
    requests: int
    items_per_request: int
    concurrency: int


#: One sample per request at high concurrency is how OpenRLHF calls; big requests are how veRL batches.
SHAPES = {
    "single-item": Shape("single-item", requests=128, items_per_request=1, concurrency=32),
    "batched": Shape("batched", requests=8, items_per_request=16, concurrency=4),
}


@dataclass
class Round:
    """One pass of a workload over one path."""

    items_per_s: float
    p50_ms: float
    p95_ms: float
    wall_s: float
    replicas: dict[str, int]


def body(shape: Shape, r: int) -> dict[str, object]:
    """Request r: items_per_request (problem, response) pairs; 8 rollouts share each problem."""
    items = []
    for k in range(shape.items_per_request):
        n = r * shape.items_per_request + k
        problem = (f"Problem {n // 8}: given a list of {n % 50 + 3} integers, return the length of the longest "
                   "strictly increasing subsequence. Read the input from stdin and print the answer.")
        code = ("import sys\nfrom bisect import bisect_left\n\ndef solve(xs):\n    tails = []\n"
                "    for x in xs:\n        i = bisect_left(tails, x)\n"
                f"        tails[i:i + 1] = [x]\n    return len(tails) + {n % 7}\n\n"
                "print(solve(list(map(int, sys.stdin.read().split()))))")
        items.append({"problem": problem, "response": f"Solution:\n```python\n{code}\n```"})
    return {"items": items}


async def run_round(url: str, shape: Shape) -> Round:
    """Send the workload with ``concurrency`` requests in flight; every request must succeed."""
    bodies = [body(shape, r) for r in range(shape.requests)]
    latencies: list[float] = []
    replicas: dict[str, int] = {}
    todo = iter(bodies)
    limits = httpx.Limits(max_connections=shape.concurrency, max_keepalive_connections=shape.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            for payload in todo:
                started = time.perf_counter()
                response = await client.post("/v1/score", json=payload)
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                name = response.headers.get("x-codescaler-replica", "single")
                replicas[name] = replicas.get(name, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(shape.concurrency)))
        wall = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=20)
    return Round(shape.requests * shape.items_per_request / wall, statistics.median(latencies) * 1000,
                 quantiles[18] * 1000, wall, replicas)


#: Ray's default ``worker_niceness``: replicas and proxies run at this niceness.
RAY_WORKER_NICENESS = 15


def start_single(settings: Settings, port: int, threads: int) -> subprocess.Popen[bytes]:
    """The single-process server (``python -m service``) with ``threads`` torch threads, at Ray's worker niceness."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    cmd = ["nice", "-n", str(RAY_WORKER_NICENESS), sys.executable, "-m", "service", "--model", settings.model, "--device", "cpu",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"single-process server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("single-process server did not become ready")


def summary(rounds: Sequence[Round]) -> dict[str, object]:
    """Per-round figures and their medians."""
    return {
        "rounds": [asdict(r) for r in rounds],
        "median_items_per_s": statistics.median(r.items_per_s for r in rounds),
        "median_p50_ms": statistics.median(r.p50_ms for r in rounds),
        "median_p95_ms": statistics.median(r.p95_ms for r in rounds),
    }


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_dir(name: str, cache: Path) -> str:
    """A local directory holding the named random model (built once)."""
    shape = {"tiny": tiny.TINY_SHAPE, "bench-25m": tiny.BENCH_SHAPE}[name]
    return str(tiny.build(cache / f"random-{name}", shape))


def main(argv: Sequence[str] | None = None) -> None:
    """Run every (model, shape, Ray configuration) side by side with the single process; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,bench-25m", help="comma-separated: tiny, bench-25m")
    parser.add_argument("--shapes", default="single-item,batched", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--ray-configs", default="1x2", help="replicas x CPUs each, comma-separated (e.g. 1x2,2x1)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per path (after one warm-up)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the single process and of the Ray instance")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "codescaler-serve")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results" / "ray_overhead.json")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    os.environ["HF_HUB_OFFLINE"] = "1"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no orphaned servers
    load_before = os.getloadavg()
    ray.init(num_cpus=args.cpus, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level="warning", log_to_driver=False)
    serve_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    results: list[dict[str, object]] = []
    try:
        for model_name in args.models.split(","):
            settings = Settings(model=model_dir(model_name, args.cache), device="cpu", log_level="warning")
            single_port = free_port()
            single = start_single(settings, single_port, args.cpus)
            try:
                for config in args.ray_configs.split(","):
                    replicas, cpus = (int(x) for x in config.split("x"))
                    ray_settings = settings.model_copy(update={"ray_min_replicas": replicas,
                                                               "ray_max_replicas": replicas})
                    serve.run(application(ray_settings, RayOptions(replica_cpus=cpus)), name=APP_NAME,
                              route_prefix="/")
                    for shape_name in args.shapes.split(","):
                        shape = SHAPES[shape_name]
                        paths = {"single": f"http://127.0.0.1:{single_port}", "ray": f"http://127.0.0.1:{serve_port}"}
                        rounds: dict[str, list[Round]] = {"single": [], "ray": []}
                        for url in paths.values():  # warm-up, not recorded
                            asyncio.run(run_round(url, shape))
                        for i in range(args.rounds):
                            order = ("single", "ray") if i % 2 == 0 else ("ray", "single")
                            for path in order:
                                rounds[path].append(asyncio.run(run_round(paths[path], shape)))
                        one, many = summary(rounds["single"]), summary(rounds["ray"])
                        entry = {
                            "model": model_name, "shape": asdict(shape), "ray_config": f"{replicas} replica(s) x "
                            f"{cpus} CPU", "single": one, "ray": many,
                            "ratio_items_per_s": many["median_items_per_s"] / one["median_items_per_s"],
                            "ratio_p50": many["median_p50_ms"] / one["median_p50_ms"],
                        }
                        results.append(entry)
                        print(f"{model_name:10} {shape_name:12} ray {config}: items/s "
                              f"{one['median_items_per_s']:8.1f} -> {many['median_items_per_s']:8.1f} "
                              f"(x{entry['ratio_items_per_s']:.2f}), p50 {one['median_p50_ms']:7.1f} -> "
                              f"{many['median_p50_ms']:7.1f} ms (x{entry['ratio_p50']:.2f})", flush=True)
                    serve.delete(APP_NAME)
            finally:
                single.terminate()
                single.wait(30)
    finally:
        serve.shutdown()
        ray.shutdown()

    import torch

    report = {
        "command": " ".join(["python loadtests/ray_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "niceness": RAY_WORKER_NICENESS,
        "machine": {"cpus_visible": os.cpu_count(), "cpus_used": args.cpus, "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "settings": {"max_batch_items": settings.max_batch_items, "max_wait_ms": settings.max_wait_ms,
                     "dtype": "float32", "device": "cpu"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
