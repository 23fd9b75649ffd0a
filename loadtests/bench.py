"""Side-by-side benchmark: the naive server (a), this service without (b) and with (c) prefix reuse.

One command (from the repository root): ``python loadtests/bench.py`` (``--quick`` for a
smoke run of about a minute). One run, one machine, one model (the ~25M-parameter BENCH_SHAPE Qwen3
classifier with random weights, built into the model cache), real server processes
over loopback, the same requests to each contender. Writes loadtests/results/bench.json
and bench.png and prints a markdown table.

Compute efficiency = model FLOP/s / GEMM peak. Model FLOPs count the tokens each
contender really ran (not padding, not the prefixes it reused):
2 * N_nonembedding per token, plus 4 * layers * heads * head_dim per attended
(query, key) pair. The GEMM peak is a 2048x2048 fp32 torch.matmul measured in this
process just before and after each contender's run (the mean of the two), because
other work on the machine changes the peak over minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import report
from loadtests.workloads import Request, Workload, grouped, mixed
from models import tiny

ROOT = Path(__file__).resolve().parent.parent
#: Service flags recommended for this CPU machine kind (see the README's Performance section).
SERVICE_ARGS = ["--max-batch-tokens", "16384", "--max-batch-items", "64", "--max-wait-ms", "5"]
CONTENDERS = {"a": "naive server (one forward per request)", "b": "codescaler-serve --no-prefix-reuse",
              "c": "codescaler-serve"}


@dataclass
class Server:
    """One contender as a real process on a loopback port."""

    key: str
    cmd: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> None:
        """Start the process, its output going to a log file."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = log_dir / f"server-{self.key}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Poll /ready until 200; a process that exits fails with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.log is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.key} exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server {self.key} not ready after {timeout} s")

    def stop(self) -> None:
        """Terminate and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Run:
    """What one contender did with one workload."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    scores: dict[tuple[int, int], float] = field(default_factory=dict)
    errors: int = 0


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def body(request: Request) -> dict[str, Any]:
    """The POST /v1/score body of a request (the naive server accepts it too)."""
    return {"items": [{"problem": p, "response": r} for p, r in request.items]}


async def _post(client: httpx.AsyncClient, url: str, index: int, request: Request, run: Run) -> None:
    start = time.perf_counter()
    try:
        response = await client.post(f"{url}/v1/score", json=body(request))
        ok = response.status_code == 200
    except httpx.HTTPError:
        ok = False
    run.latencies.append(time.perf_counter() - start)
    if not ok:
        run.errors += 1
        return
    for j, result in enumerate(response.json()["results"]):
        if result.get("score") is None:
            run.errors += 1
        else:
            run.scores[(index, j)] = float(result["score"])


async def closed_loop(url: str, workload: Workload) -> Run:
    """``concurrency`` clients, each sending the next request as soon as its previous one is answered."""
    run, order = Run(), iter(enumerate(workload.requests))
    limits = httpx.Limits(max_connections=workload.concurrency, max_keepalive_connections=workload.concurrency)
    async with httpx.AsyncClient(timeout=1800.0, limits=limits) as client:
        async def worker() -> None:
            for index, request in order:
                await _post(client, url, index, request, run)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workload.concurrency)))
        run.seconds = time.perf_counter() - start
    return run


async def open_loop(url: str, workload: Workload, rate: float) -> Run:
    """Requests started at a fixed rate (items per second) whatever the answers do."""
    run = Run()
    async with httpx.AsyncClient(timeout=1800.0, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        tasks, sent = [], 0
        for index, request in enumerate(workload.requests):
            await asyncio.sleep(max(0.0, start + sent / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(_post(client, url, index, request, run)))
            sent += len(request.items)
        await asyncio.gather(*tasks)
        run.seconds = time.perf_counter() - start
    return run


def scrape(url: str) -> dict[str, float]:
    """The service counters this benchmark reads from /metrics (absent for the naive server)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"codescaler_tokens_total", "codescaler_batch_padding_ratio_sum", "codescaler_batch_padding_ratio_count",
              "codescaler_batch_items_sum", "codescaler_batch_items_count"}
    out: dict[str, float] = {}
    try:
        response = httpx.get(f"{url}/metrics", timeout=10.0)
    except httpx.HTTPError:
        return out
    if response.status_code != 200:
        return out
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = sample.value
            if sample.name == "codescaler_batch_padding_ratio_bucket" and sample.labels.get("le") == "0.05":
                out["padding_le_0_05"] = sample.value
    return out


def model_facts(model_dir: Path) -> dict[str, Any]:
    """Shape and non-embedding parameter count, read from the saved weights."""
    from safetensors import safe_open

    params = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            for name in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                if "embed_tokens" not in name:
                    shape = weights.get_slice(name).get_shape()
                    params += int(torch.Size(shape).numel())
    config = json.loads((model_dir / "config.json").read_text())
    pair = 4 * config["num_hidden_layers"] * config["num_attention_heads"] * config["head_dim"]
    shape = {k: config[k] for k in tiny.BENCH_SHAPE}
    return {"dir": str(model_dir), "shape": shape, "non_embedding_params": params, "flops_per_attention_pair": pair,
            "dtype": "float32"}


def model_flops(workload: Workload, facts: dict[str, Any], ran_tokens: int | None) -> float:
    """FLOPs of the tokens really run: all of each item, less the prefix tokens that were reused.

    Reused tokens are taken off at the mean problem length's attention cost (an
    approximation: the service does not report which prefixes it reused).
    """
    n, pair = facts["non_embedding_params"], facts["flops_per_attention_pair"]
    lengths = [length for r in workload.requests for length in r.lengths]
    full = sum(2 * n * length + pair * length * (length + 1) / 2 for length in lengths)
    if ran_tokens is None:
        return full
    prefixes = [p for r in workload.requests for p in r.prefix_lengths]
    saved = max(0, sum(lengths) - ran_tokens)
    return full - saved * (2 * n + pair * (statistics.mean(prefixes) + 1) / 2)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(workload: Workload, run: Run, before: dict[str, float], after: dict[str, float],
              peak: float, facts: dict[str, Any]) -> dict[str, Any]:
    """The reported numbers of one run."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    ran_tokens = int(delta["codescaler_tokens_total"]) if "codescaler_tokens_total" in delta else None
    batches = delta.get("codescaler_batch_padding_ratio_count", 0.0)
    if batches:
        padding = {"mean": delta["codescaler_batch_padding_ratio_sum"] / batches,
                   "share_of_batches_le_0.05": delta.get("padding_le_0_05", 0.0) / batches,
                   "batches": int(batches), "mean_batch_items": delta["codescaler_batch_items_sum"] / batches}
    else:  # the naive server: one padded forward per request, computed from the request lengths
        ratios = [1 - sum(r.lengths) / (len(r.lengths) * max(r.lengths)) for r in workload.requests]
        padding = {"mean": statistics.mean(ratios), "share_of_batches_le_0.05": sum(x <= 0.05 for x in ratios) / len(ratios),
                   "batches": len(ratios), "mean_batch_items": workload.items / len(ratios)}
    flops = model_flops(workload, facts, ran_tokens)
    gflops = flops / run.seconds / 1e9
    return {
        "seconds": round(run.seconds, 3), "items": workload.items, "errors": run.errors,
        "items_per_s": workload.items / run.seconds, "tokens_per_s": workload.tokens / run.seconds,
        "latency_s": {f"p{q}": percentile(run.latencies, q) for q in (50, 95, 99)},
        "tokens_run": ran_tokens if ran_tokens is not None else workload.tokens,
        "padding_ratio": padding, "model_gflop_per_s": gflops, "gemm_peak_gflop_per_s": peak,
        "compute_efficiency": gflops / peak,
    }


def measurer(model_dir: Path) -> Any:
    """(problem, code) -> (tokens, problem-only prefix tokens), exactly as the service tokenizes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")

    def measure(problem: str, code: str) -> tuple[int, int]:
        chat = [{"role": "user", "content": problem}, {"role": "assistant", "content": code}]
        ids = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
        return len(ids), max(i for i, t in enumerate(ids) if t == im_start) + 1

    return measure


def build_workloads(measure: Any, quick: bool) -> tuple[list[Workload], Workload]:
    """The three compared workloads and the GRPO traffic of the half-rate latency run."""
    s = 0.25 if quick else 1.0

    def grpo(name: str, groups: int, seed: int) -> Workload:
        return grouped(name, "GRPO: groups of 8 answers sharing a ~600-token problem, ~300-token answers, "
                       "one item per request", groups=groups, group_size=8, per_request=1,
                       problem_tokens=round(600 * s), code_tokens=round(300 * s),
                       concurrency=16 if quick else 64, seed=seed, measure=measure)

    compared = [
        grpo("grpo", 2 if quick else 24, 1),
        grouped("best_of_n", "best-of-N: 16 candidates per request, ~600-token problem, ~300-token answers",
                groups=1 if quick else 8, group_size=16, per_request=16, problem_tokens=round(600 * s),
                code_tokens=round(300 * s), concurrency=2 if quick else 4, seed=2, measure=measure),
        mixed("mixed", "mixed lengths: a problem each (50-1500 tokens), answers of 30-700 tokens, one item "
              "per request", items=8 if quick else 96, problem_range=(round(50 * s) + 5, round(1500 * s)),
              code_range=(round(30 * s) + 5, round(700 * s)), concurrency=8 if quick else 32, seed=3,
              measure=measure),
    ]
    return compared, grpo("grpo_half_rate", 2 if quick else 12, 4)


def main(argv: list[str] | None = None) -> None:
    """Run everything, write bench.json and bench.png, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of about a minute: the tiny model, small counts and lengths")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every server and of the GEMM peak (default: torch's, all cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results")
    parser.add_argument("--model-cache", type=Path, default=tiny.default_cache_dir())
    parser.add_argument("--service-arg", action="append", default=[], help="extra flag for (b) and (c)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.time(), list(os.getloadavg())
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the three servers
    if args.quick:
        model_dir = tiny.build_tiny(args.model_cache)
    else:
        model_dir = tiny.build(args.model_cache / "bench-25m", tiny.BENCH_SHAPE)
    facts = model_facts(model_dir)
    service = [sys.executable, "-m", "service", "--model", str(model_dir), "--log-level", "warning",
               *SERVICE_ARGS, *args.service_arg]
    servers = {"a": Server("a", [sys.executable, "-m", "loadtests.naive", "--model", str(model_dir)], free_port()),
               "b": Server("b", [*service, "--no-prefix-reuse"], free_port()),
               "c": Server("c", service, free_port())}
    for server in servers.values():
        server.cmd += ["--port", str(server.port)]
    peak_size = 512 if args.quick else 2048
    results: dict[str, Any] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="codescaler-bench-"))
    try:
        for server in servers.values():
            server.start(log_dir)
        compared, half = build_workloads(measurer(model_dir), args.quick)  # while the servers load
        for server in servers.values():
            server.wait_ready()
        _log(started, "servers ready")
        for workload in compared:
            runs: dict[str, Any] = {}
            scores: dict[str, dict[tuple[int, int], float]] = {}
            for key, server in servers.items():
                peak_before, before = _gemm(peak_size), scrape(server.url)
                run = asyncio.run(closed_loop(server.url, workload))
                after, peak_after = scrape(server.url), _gemm(peak_size)
                runs[key] = summarize(workload, run, before, after, (peak_before + peak_after) / 2, facts)
                scores[key] = run.scores
                _log(started, f"{workload.name} ({key}): {runs[key]['items_per_s']:.2f} items/s")
            results[workload.name] = {
                "description": workload.description, "items": workload.items, "requests": len(workload.requests),
                "concurrency": workload.concurrency, "tokens": workload.tokens, "contenders": runs,
                "ratios": {"c/a": runs["c"]["items_per_s"] / runs["a"]["items_per_s"],
                           "c/b": runs["c"]["items_per_s"] / runs["b"]["items_per_s"]},
                "max_abs_score_diff": {pair: max((abs(scores[pair[0]][k] - scores["c"][k]) for k in scores["c"]
                                                  if k in scores[pair[0]]), default=None)
                                       for pair in ("a", "b")},
            }
        rate = results["grpo"]["contenders"]["c"]["items_per_s"] / 2
        run = asyncio.run(open_loop(servers["c"].url, half, rate))
        half_rate = {"rate_items_per_s": rate, "items": half.items, "errors": run.errors,
                     "p50_s": percentile(run.latencies, 50), "p99_s": percentile(run.latencies, 99)}
        half_rate["p99_over_p50"] = half_rate["p99_s"] / half_rate["p50_s"]
    finally:
        for server in servers.values():
            server.stop()
    document = {
        "schema": 1, "quick": args.quick, "command": "python loadtests/bench.py" + (" --quick" if args.quick else ""),
        "started_unix": started, "wall_seconds": time.time() - started,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "loadavg_at_start": load_at_start, "loadavg_at_end": list(os.getloadavg())},
        "model": facts, "contenders": CONTENDERS, "service_args": SERVICE_ARGS + args.service_arg,
        "flops_formula": "2 * non_embedding_params * tokens_run + 4 * layers * heads * head_dim * attended_pairs; "
                         "efficiency = model FLOP/s / fp32 GEMM peak (2048x2048 matmul, same process, "
                         "mean of before and after each run)",
        "workloads": results, "half_rate": half_rate,
    }
    document["targets"] = report.targets(document)
    report.write(args.out, document)
    print(report.table(document))


def _log(started: float, message: str) -> None:
    print(f"[{time.time() - started:6.1f} s] {message}", file=sys.stderr, flush=True)


def _gemm(n: int) -> float:
    """fp32 torch.matmul GFLOP/s at size ``n`` now: best of 3 after a warm-up (512 in quick runs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / min(_timed(lambda: a @ b) for _ in range(3)) / 1e9


if __name__ == "__main__":
    main()
