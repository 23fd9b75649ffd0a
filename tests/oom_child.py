"""Child process of tests/test_oom.py: a real allocation failure inside the scorer, under an address-space limit.

Run as ``python tests/oom_child.py MODEL_CACHE``; prints one JSON object. The tiny model
runs the CUDA path of the packed runner on the reference kernel, whose score matrices
grow with the queries of a group times its prefix. After the app is up and its threads
exist, the process's address space is capped a little above what it uses, so a full
batch of 32 rollouts cannot allocate, a few rollouts can, and one very long item cannot
even alone. Nothing is injected: the failure is the CPU allocator's own.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADROOM = 160 << 20  # bytes above the current use: ~4 rollouts' score matrices, not 32's


def vm_size() -> int:
    """Bytes of this process's address space (what RLIMIT_AS limits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


async def main(cache: Path) -> dict[str, object]:
    from models.hf import HFScorer
    from service.app import create_app
    from service.settings import Settings
    from tests.helpers import app_client

    scorer = HFScorer("tiny-random", cache_dir=cache, device="cpu", dtype="float32", kernel="reference",
                      chunk_tokens=16384, prefix_cache_bytes=0)
    problem = "Sort the numbers. " + " ".join(f"n{k}" for k in range(450))
    codes = [f"def solve(xs):\n    return sorted(xs)[{k}:]  # " + "pad " * 119 + "end" for k in range(32)]
    giant = "x = [" + ", ".join(str(k) for k in range(700)) + "]"  # ~2,700 tokens: fits max_length
    items = [{"problem": problem, "response": f"```python\n{c}\n```"} for c in codes]
    items.append({"problem": "Print a list.", "response": f"```python\n{giant}\n```"})
    expected = [scorer.score([scorer.encode(problem, c)])[0] for c in codes]

    attempts: list[tuple[int, bool]] = []  # (items, succeeded) per scoring call, observed not altered
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
    app = create_app(Settings(model="tiny-random", max_batch_items=64, max_wait_ms=50,  # type: ignore[call-arg]
                              result_cache_items=0), scorer)
    async with app_client(app) as client:
    
        warm = await client.post("/v1/score", json={"items": items[:1]})  # threads and buffers exist now
        assert warm.status_code == 200, warm.text
        attempts.clear()
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + HEADROOM, hard))
        try:
            r = await client.post("/v1/score", json={"items": items, "shaping": "none"})
            after = await client.post("/v1/score", json={"items": items[:2], "shaping": "none"})
            ready = await client.get("/ready")
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    results = r.json()["results"]
    return {
        "status": r.status_code, "scores": [x["score"] for x in results], "errors": [x["error"] for x in results],
        "expected": expected, "attempts": attempts, "after_status": after.status_code,
        "after_scores": [x["score"] for x in after.json()["results"]], "ready": ready.status_code,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
