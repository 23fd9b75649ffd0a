"""Side-by-side benchmark: the naive server (a), this service without (b) and with (c) prefix reuse.

One command (from the repository root): ``python loadtests/bench.py``; ``--quick`` is a smoke
run of a minute or two with the tiny model. One run, one machine, one model (the ~25M-parameter
BENCH_SHAPE Qwen3 classifier with random weights, built into the model cache), real server
processes over loopback, the same requests to each contender. Writes
loadtests/results/bench.json and bench.png and prints a markdown table.

Other work on a shared machine changes its speed over minutes, so each workload runs in
rounds with the contenders interleaved (a b c, then c b a, ...): a slow spell hits all three
alike, and the ratios stay meaningful.

Each workload also reports its reuse ceiling: the FLOPs of every item run whole over the
FLOPs with each problem run once (what perfect prefix reuse could save), and how much of
it (c) reaches against a plain in-process loop (tokenize, one forward per item) timed in
the same run: ``share_of_ceiling = ((c) items/s / loop items/s) / ceiling``.
``--device cuda --dtype bfloat16`` runs the same comparison on a GPU.

Compute efficiency = model FLOP/s / GEMM peak. Model FLOPs count the tokens each
contender really ran (not padding, not the prefixes it reused):
2 * N_nonembedding per token, plus 4 * layers * heads * head_dim per attended
(query, key) pair. The GEMM peak is a 2048x2048 fp32 torch.matmul measured in this
process just before and after each of the contender's rounds (their mean).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import report
from loadtests.flops import model_facts, model_flops, reuse_ceiling
from loadtests.harness import (
    ROOT,
    PlainLoop,
    Run,
    Server,
    closed_loop,
    free_port,
    open_loop,
    percentile,
    scrape,
)
from loadtests.workloads import Workload, grouped, mixed
from models import tiny

#: Service flags recommended for this CPU machine kind (see the README's Performance section).
SERVICE_ARGS = ["--max-batch-tokens", "16384", "--max-batch-items", "64", "--max-wait-ms", "5"]
CONTENDERS = {"a": "naive server (one forward per request)", "b": "codescaler-serve --no-prefix-reuse",
              "c": "codescaler-serve"}


def summarize(workload: Workload, run: Run, facts: dict[str, Any]) -> dict[str, Any]:
    """The reported numbers of one contender on one workload (all its rounds)."""
    delta = run.metrics
    ran_tokens = int(delta["codescaler_tokens_total"]) if "codescaler_tokens_total" in delta else None
    batches = delta.get("codescaler_batch_padding_ratio_count", 0.0)
    if batches:
        padding = {"mean": delta["codescaler_batch_padding_ratio_sum"] / batches,
                   "share_of_batches_le_0.05": delta.get("padding_le_0_05", 0.0) / batches,
                   "batches": int(batches), "mean_batch_items": delta["codescaler_batch_items_sum"] / batches}
    else:  # the naive server: one padded forward per request, computed from the request lengths
        ratios = [1 - sum(r.lengths) / (len(r.lengths) * max(r.lengths)) for r in workload.requests]
        padding = {"mean": statistics.mean(ratios),
                   "share_of_batches_le_0.05": sum(x <= 0.05 for x in ratios) / len(ratios),
                   "batches": len(ratios), "mean_batch_items": workload.items / len(ratios)}
    gflops = model_flops(workload, facts, ran_tokens) / run.seconds / 1e9
    peak = statistics.mean(run.peaks)
    return {
        "seconds": round(run.seconds, 3), "items": workload.items, "errors": run.errors,
        "items_per_s": workload.items / run.seconds, "tokens_per_s": workload.tokens / run.seconds,
        "latency_s": {f"p{q}": percentile(run.latencies, q) for q in (50, 95, 99)},
        "tokens_run": ran_tokens if ran_tokens is not None else workload.tokens,
        "padding_ratio": padding, "model_gflop_per_s": gflops, "gemm_peak_gflop_per_s": peak,
        "compute_efficiency": gflops / peak,
    }


def compare(workload: Workload, servers: dict[str, Server], rounds: int, peak: Any,
            facts: dict[str, Any], started: float, loop: PlainLoop) -> dict[str, Any]:
    """Every contender on ``workload``, in interleaved rounds; the workload's entry of bench.json.

    The plain in-process loop runs each round's requests too, between the servers' turns,
    so that it sees the same machine (the servers are idle meanwhile).
    """
    runs = {key: Run() for key in servers}
    loop.seconds, loop.items = 0.0, 0
    for number, part in enumerate(workload.rounds(rounds)):
        loop.run([request for _, request in part])
        for key in sorted(servers, reverse=number % 2 == 1):  # a b c, then c b a, ...
            run, url = runs[key], servers[key].url
            run.peaks.append(peak())
            before = scrape(url)
            asyncio.run(closed_loop(url, part, workload.concurrency, run))
            for name, value in scrape(url).items():
                run.metrics[name] = run.metrics.get(name, 0.0) + value - before.get(name, 0.0)
            run.peaks.append(peak())
            _log(started, f"{workload.name} round {number + 1} ({key}) done")
    out = {key: summarize(workload, run, facts) for key, run in runs.items()}
    for key in out:
        _log(started, f"{workload.name} ({key}): {out[key]['items_per_s']:.2f} items/s")
    scores = {key: run.scores for key, run in runs.items()}
    ceiling = reuse_ceiling(workload, facts)
    over_loop = out["c"]["items_per_s"] / loop.items_per_s
    return {
        "description": workload.description, "items": workload.items, "requests": len(workload.requests),
        "concurrency": workload.concurrency, "tokens": workload.tokens, "rounds": rounds, "contenders": out,
        "ratios": {"c/a": out["c"]["items_per_s"] / out["a"]["items_per_s"],
                   "c/b": out["c"]["items_per_s"] / out["b"]["items_per_s"], "c/loop": over_loop},
        "loop_items_per_s": loop.items_per_s, "reuse_ceiling": ceiling, "share_of_ceiling": over_loop / ceiling,
        "max_abs_score_diff": {key: max((abs(scores[key][k] - scores["c"][k]) for k in scores["c"]
                                         if k in scores[key]), default=None) for key in ("a", "b")},
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
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per workload")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for every contender")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype of every contender (and of the GEMM peak)")
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
    on = ["--device", args.device, "--dtype", args.dtype]
    service = [sys.executable, "-m", "service", "--model", str(model_dir), "--log-level", "warning",
               *SERVICE_ARGS, *on, *args.service_arg]
    naive = [sys.executable, "-m", "loadtests.naive", "--model", str(model_dir), *on]
    servers = {"a": Server("a", naive, free_port()),
               "b": Server("b", [*service, "--no-prefix-reuse"], free_port()),
               "c": Server("c", service, free_port())}
    for server in servers.values():
        server.cmd += ["--port", str(server.port)]
    peak_size = 512 if args.quick else (2048 if args.device == "cpu" else 8192)
    facts["dtype"] = args.dtype

    def peak() -> float:
        return _gemm(peak_size, torch.device(args.device), getattr(torch, args.dtype))

    results: dict[str, Any] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="codescaler-bench-"))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the servers below are stopped
    try:
        for server in servers.values():
            server.start(log_dir)
        compared, half = build_workloads(measurer(model_dir), args.quick)  # while the servers load
        for server in servers.values():
            server.wait_ready()
        _log(started, f"servers ready; logs in {log_dir}")
        loop = PlainLoop(model_dir, args.device, args.dtype)
        for workload in compared:
            results[workload.name] = compare(workload, servers, args.rounds, peak, facts, started, loop)
            _log(started, f"{workload.name} (plain in-process loop): {loop.items_per_s:.2f} items/s")
        rate = results["grpo"]["contenders"]["c"]["items_per_s"] / 2
        run = asyncio.run(open_loop(servers["c"].url, half.requests, rate))
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
        "model": facts, "contenders": CONTENDERS, "service_args": SERVICE_ARGS + on + args.service_arg,
        "flops_formula": "2 * non_embedding_params * tokens_run + 4 * layers * heads * head_dim * attended_pairs; "
                         "efficiency = model FLOP/s / fp32 GEMM peak (2048x2048 matmul, same process, "
                         "mean of the measurements before and after each of the contender's rounds)",
        "workloads": results, "half_rate": half_rate,
    }
    document["targets"] = report.targets(document)
    report.write(args.out, document)
    print(report.table(document))


def _log(started: float, message: str) -> None:
    print(f"[{time.time() - started:6.1f} s] {message}", file=sys.stderr, flush=True)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gemm(n: int, device: torch.device, dtype: torch.dtype) -> float:
    """torch.matmul GFLOP/s at size ``n`` now on the contenders' device and dtype: best of 3 after a warm-up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def product() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    product()
    return 2 * n**3 / min(_timed(product) for _ in range(3)) / 1e9


if __name__ == "__main__":
    main()
