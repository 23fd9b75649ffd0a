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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEADROOM = 120 << 20  # bytes above the current use: a few rollouts' score matrices, not 32's


async def main(cache: Path) -> dict[str, object]:
    import torch

    from loadtests.oom_check import memory_capped, record_attempts
    from models.hf import HFScorer
    from service.app import create_app
    from service.settings import Settings
    from tests.helpers import app_client

    scorer = HFScorer("tiny-random", cache_dir=cache, device="cpu", dtype="float32", kernel="reference",
                      chunk_tokens=16384, prefix_cache_bytes=0)
    problem = "Sort the numbers. " + " ".join(f"n{k}" for k in range(150))
    codes = [f"def solve(xs):\n    return sorted(xs)[{k}:]  # " + "pad " * 280 + "end" for k in range(32)]
    giant = "x = [" + ", ".join(str(k) for k in range(700)) + "]"  # ~2,700 tokens: fits max_length
    items = [{"problem": problem, "response": f"```python\n{c}\n```"} for c in codes]
    items.append({"problem": "Print a list.", "response": f"```python\n{giant}\n```"})
    expected = [scorer.score([scorer.encode(problem, c)])[0] for c in codes]

    attempts = record_attempts(scorer)  # (items, succeeded) per scoring call
    app = create_app(Settings(model="tiny-random", max_batch_items=64, max_wait_ms=50,  # type: ignore[call-arg]
                              result_cache_items=0), scorer)
    async with app_client(app) as client:
    
        warm = await client.post("/v1/score", json={"items": items[:1]})  # threads and buffers exist now
        assert warm.status_code == 200, warm.text
        attempts.clear()
        with memory_capped(torch.device("cpu"), HEADROOM):
            r = await client.post("/v1/score", json={"items": items, "shaping": "none"})
            after = await client.post("/v1/score", json={"items": items[:2], "shaping": "none"})
            ready = await client.get("/ready")
    results = r.json()["results"]
    return {
        "status": r.status_code, "scores": [x["score"] for x in results], "errors": [x["error"] for x in results],
        "expected": expected, "attempts": attempts, "after_status": after.status_code,
        "after_scores": [x["score"] for x in after.json()["results"]], "ready": ready.status_code,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(Path(sys.argv[1])))))
