"""Benchmark harness: contenders as real server processes on loopback, and the traffic sent to them."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from loadtests.workloads import Request

ROOT = Path(__file__).resolve().parent.parent


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
    """What one contender did with one workload, summed over its rounds."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    scores: dict[tuple[int, int], float] = field(default_factory=dict)
    errors: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # /metrics counters gained during the rounds
    peaks: list[float] = field(default_factory=list)  # GEMM GFLOP/s measured around the rounds


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


async def closed_loop(url: str, requests: Sequence[tuple[int, Request]], concurrency: int, run: Run) -> None:
    """``concurrency`` clients, each sending the next request as soon as its previous one is answered.

    ``requests`` are (index, request) pairs; answers and latencies are added to ``run``.
    """
    order = iter(requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=1800.0, limits=limits) as client:
        async def worker() -> None:
            for index, request in order:
                await _post(client, url, index, request, run)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds += time.perf_counter() - start


async def open_loop(url: str, requests: Sequence[Request], rate: float) -> Run:
    """Requests started at a fixed rate (items per second) whatever the answers do."""
    run = Run()
    async with httpx.AsyncClient(timeout=1800.0, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        tasks, sent = [], 0
        for index, request in enumerate(requests):
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


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


class PlainLoop:
    """The plainest in-process scorer: template, tokenize and one forward per item (no server)."""

    def __init__(self, model_dir: Path, device: str, dtype: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        self.model = model.to(device).eval()
        self.seconds = 0.0
        self.items = 0

    def run(self, requests: list[Any]) -> None:
        """Score every item of ``requests`` one by one; add the time taken."""
        from loadtests.naive import FENCE

        start = time.perf_counter()
        with torch.inference_mode():
            for request in requests:
                for problem, response in request.items:
                    found = FENCE.findall(response)
                    chat = [{"role": "user", "content": problem},
                            {"role": "assistant", "content": found[0].strip() if len(found) == 1 else ""}]
                    text = self.tokenizer.apply_chat_template(chat, tokenize=False)
                    ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                    self.model(input_ids=ids.to(self.device)).logits[0, 0].item()
                    self.items += 1
        self.seconds += time.perf_counter() - start

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds
