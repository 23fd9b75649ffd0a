"""Part (c) of the GPU check: a batch far too large for the memory left, and the service recovering.

The device is capped just above what is in use (``set_per_process_memory_fraction``;
on a CPU, the address space with RLIMIT_AS) and a batch that cannot fit is sent
through the real Engine and Batcher. Recovered: every item answered (the batch split
in halves until the parts fit) and the next request scored normally. tests/oom_child.py
uses the same cap for the CPU test of the same claim.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from models.hf import HFScorer


@contextlib.contextmanager
def memory_capped(device: torch.device, headroom: int):  # type: ignore[no-untyped-def]
    """Allow only ``headroom`` bytes beyond what is in use now (the device's, or the address space on CPU)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(device) + headroom) / total, device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    import resource

    vm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def record_attempts(scorer: HFScorer) -> list[tuple[int, bool]]:
    """From now on, (items, succeeded) of every scoring call of ``scorer``: observed, not altered."""
    attempts: list[tuple[int, bool]] = []
    real = scorer.score_with_stats

    def observed(batch):  # type: ignore[no-untyped-def]
        try:
            out = real(batch)
        except BaseException:
            attempts.append((len(batch), False))
            raise
        attempts.append((len(batch), True))
        return out

    scorer.score_with_stats = observed  # type: ignore[method-assign]
    return attempts


#: Scorer options of the check: one forward holds the whole batch (the CPU's score matrices of
#: the reference kernel are what grows with it there); nothing kept between batches.
SCORER_OPTIONS = {"max_batch_tokens": 16384, "max_batch_items": 64, "chunk_tokens": 16384, "prefix_cache_bytes": 0}


def kernel_for(device: torch.device) -> str:
    """On a CPU the reference kernel, whose memory grows with the batch; the device's own elsewhere."""
    return "reference" if device.type == "cpu" else "auto"


async def check_oom(scorer: HFScorer, device: torch.device) -> dict[str, Any]:
    """(c): a batch far too large for the memory left, through the real Engine; the service recovers.

    ``scorer`` is built with SCORER_OPTIONS and ``kernel_for(device)``.
    """
    from service.engine import Engine, ItemInput
    from service.metrics import Metrics
    from service.settings import Settings

    attempts = record_attempts(scorer)
    settings = Settings(model="random-oom", max_batch_tokens=16384, max_batch_items=64, max_length=4096,  # type: ignore[call-arg]
                        max_wait_ms=100, result_cache_items=0)
    engine = Engine(scorer, settings, Metrics())
    await engine.start()
    problem = "Sort the numbers. " + " ".join(f"n{k}" for k in range(150))
    inputs = [ItemInput(problem, f"```python\nprint(sorted(xs)[{k}:])  # " + "pad " * 280 + "end\n```")
              for k in range(32)]
    try:
        await engine.score(inputs[:1])
        attempts.clear()
        with memory_capped(device, (120 << 20) if device.type == "cpu" else (1 << 30)):
            outcomes = await engine.score(inputs)
        after = await engine.score(inputs[:2])
    finally:
        await engine.stop()
    answered = sum(o.valid for o in outcomes)
    return {"attempts": attempts, "answered": answered, "out_of_memory_items": sum(o.error == "out_of_memory"
                                                                                   for o in outcomes),
            "oom_recovered": bool(attempts) and not attempts[0][1] and answered == len(inputs)
            and all(o.valid for o in after)}
