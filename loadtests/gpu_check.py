"""The GPU check in one command: exactness, GRPO throughput and MFU, out-of-memory recovery.

    python loadtests/gpu_check.py --out loadtests/results/gpu_check.json      # one CUDA GPU, <= 8 min
    python loadtests/gpu_check.py --device cpu --quick --out /tmp/check.json  # same code, tiny shapes

(a) exactness: a random 1.7B-shaped Qwen3 classifier, packed bf16 scoring with prefix
    reuse (the service's path) against the plain fp32 forward of the same weights, 64
    pairs (8 problems x 8 candidates): max/mean absolute difference, best-of-N agreement.
(b) one GRPO training step on a random 8B-shaped model (hidden 4096, 36 layers, 32 heads,
    8 KV heads): 128 problems x 8 rollouts of ~1,500 tokens, ~60% of them the shared
    problem; batches cut by the scorer's own cost at the batch budget; with and without
    reuse; MFU = model FLOP/s over the bf16 GEMM peak measured in this run.
(c) out of memory: the device (CPU: the address space) is capped just above what is in
    use and a batch far too large is sent through the real Engine and Batcher; recovered
    = every item answered, the batch split, and the next request scored normally.
First, the attention kernel the service picks on this device is checked against the
plain computation (models/attention.py: LSE layout, bottom-right causal alignment; FA3
switched back to FA2 if it fails), as every server does at warm-up.
Each part is written to the JSON as soon as it is done, and a part that fails is
recorded with its error while the others still run (the exit code is then 1): a
first run on a new machine should return every figure it can.
Weights are random (scores are meaningless; the score head is scaled to the range of
real CodeScaler scores, ~±5, so that bf16 resolution matters as it would).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.flops import forward_flops
from loadtests.oom_check import SCORER_OPTIONS, check_oom, kernel_for
from models import attention, memory, tiny
from models.base import EncodedItem, first_line
from models.hf import HFScorer

SHAPE_1_7B = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}
SHAPE_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}


def random_model(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A seeded random Qwen3 reward model built directly on ``device``."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    config = Qwen3Config(vocab_size=tiny.VOCAB_SIZE, max_position_embeddings=40960, num_labels=1,
                         pad_token_id=tiny.PAD_TOKEN_ID, tie_word_embeddings=False, attn_implementation="sdpa",
                         **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3ForSequenceClassification(config).to(dtype).eval()


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.tokenizer_files_dir()))


def serve(name: str, network: Any, device: torch.device, dtype: str, **options: Any) -> HFScorer:
    return HFScorer(name, device=str(device), dtype=dtype, loaded=(tokenizer(), network), **options)


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Best FLOP/s of an n x n matmul now (after a warm-up), the ceiling MFU is measured against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        sync(device)
        start = time.perf_counter()
        for _ in range(8):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 8)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_attention(device: torch.device) -> dict[str, Any]:
    """The service's attention kernel on this device against the plain computation (warm-up's check)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name, fa3 = attention.select("auto", device, dtype)  # as HFScorer picks it
    fa3 = attention.verify(name, device, dtype, fa3=fa3)  # raises KernelMismatch: the part fails
    return {"kernel": name, "dtype": str(dtype).removeprefix("torch."), "fa3": fa3, "contract": "kept"}


def check_exactness(device: torch.device, quick: bool) -> dict[str, Any]:
    """(a): bf16 packed with reuse against the fp32 plain forward, same weights, 64 pairs."""
    shape = tiny.TINY_SHAPE if quick else SHAPE_1_7B
    reference = random_model(shape, device, torch.float32)
    probe = torch.randint(1000, 100000, (1, 256), device=device)
    with torch.inference_mode():
        spread = reference(input_ids=probe).logits.float().abs().item() + 1e-6
    reference.score.weight.data.mul_(3.0 / spread)  # scores of a few units, like CodeScaler's
    served = random_model(shape, device, torch.bfloat16)
    served.load_state_dict(reference.state_dict())
    scorer = serve("random-1.7b-shape", served, device, "bfloat16", max_length=2048)
    scorer.warmup()  # as the service starts: kernel check, the largest batch twice, cache sized
    words = ["array", "sum", "return", "value", "index", "sorted", "print", "line", "query", "number"]
    pairs = []
    for p in range(8):
        problem = f"Problem {p}: " + " ".join(words[(p * 7 + k) % 10] for k in range(60 if quick else 400))
        pairs += [(problem, "def solve(xs):\n" + "".join(f"    v{j} = xs[{j}] * {c + j}\n" for j in range(3 + c))
                   + "    return v0") for c in range(8)]
    items = [scorer.encode(p, c) for p, c in pairs]
    got = scorer.score(items)
    cached = scorer.score(items)  # the second call reads the prefixes from the cache
    with torch.inference_mode():
        plain = [float(reference(input_ids=torch.tensor([i.input_ids], device=device)).logits[0, 0]) for i in items]
    diffs = [abs(a - b) for a, b in zip(got + cached, plain + plain, strict=True)]
    agree = sum(max(range(8), key=lambda k: got[8 * p + k]) == max(range(8), key=lambda k: plain[8 * p + k])
                for p in range(8))
    info = {k: scorer.info()[k] for k in ("attention_kernel", "runner", "prefix_cache_bytes")}
    del reference, served, scorer
    memory.release(device)
    return {"shape": shape, "pairs": len(items), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "best_of_n_agreement": agree / 8, "score_range": [min(plain), max(plain)], "served": info}


def grpo_items(problems: int, rollouts: int, length: int, shared: float, seed: int) -> list[EncodedItem]:
    """Random token ids: each problem's ``shared`` share of ``length`` tokens, then each rollout's own."""
    gen = torch.Generator().manual_seed(seed)
    prefix, own = round(length * shared), length - round(length * shared)
    items = []
    for _ in range(problems):
        head = tuple(torch.randint(1000, 100000, (prefix,), generator=gen).tolist())
        for _ in range(rollouts):
            items.append(EncodedItem(head + tuple(torch.randint(1000, 100000, (own,), generator=gen).tolist()),
                                     prefix))
    return items


def batches(scorer: HFScorer, items: list[EncodedItem], budget: int) -> list[list[EncodedItem]]:
    """Items cut in order into batches by the scorer's own cost, as the batcher fills them."""
    out: list[list[EncodedItem]] = [[]]
    cost = scorer.batch_cost()
    for item in items:
        if out[-1] and (cost.cost_with(item) > budget or len(out[-1]) >= scorer.max_batch_items):
            out.append([])
            cost = scorer.batch_cost()
        cost.add(item)
        out[-1].append(item)
    return out


def model_flops(items: list[EncodedItem], shape: dict[str, int], params: int, reuse: bool) -> float:
    """2 x params per token run, plus 4 x layers x heads x head_dim per attended (query, key) pair."""
    pair = 4 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"]
    keyed = ((item.input_ids[: item.prefix_len], item.length, item.prefix_len) for item in items)
    return forward_flops(keyed, params, pair, reuse)


def check_grpo(device: torch.device, quick: bool, budget: int) -> dict[str, Any]:
    """(b): one GRPO step, with and without prefix reuse, on the 8B shape."""
    shape = tiny.TINY_SHAPE if quick else SHAPE_8B
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # what each device serves in
    network = random_model(shape, device, getattr(torch, dtype))
    params = sum(p.numel() for n, p in network.named_parameters() if "embed_tokens" not in n)
    scorer = serve("random-8b-shape", network, device, dtype, max_batch_tokens=budget,
                   max_batch_items=256, chunk_tokens=budget, prefix_cache_bytes=0)
    items = grpo_items(8 if quick else 128, 8, 300 if quick else 1500, 0.6, seed=1)
    scorer.score(batches(scorer, items, budget)[0][:16])  # kernels warm
    result: dict[str, Any] = {"shape": shape, "items": len(items), "batch_tokens": budget,
                              "non_embedding_params": params}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for reuse in (True, False):
        scorer.prefix_reuse = reuse
        plan = batches(scorer, items, budget)
        sync(device)
        start = time.perf_counter()
        for batch in plan:
            scorer.score(batch)
        sync(device)
        seconds = time.perf_counter() - start
        name = "reuse" if reuse else "no_reuse"
        result[f"items_per_s_{name}"] = len(items) / seconds
        result[f"seconds_{name}"] = seconds
        result[f"batches_{name}"] = len(plan)
        result[f"model_flops_{name}"] = model_flops(items, shape, params, reuse)
    peak = gemm_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32, 512 if quick else 8192)
    result["gemm_peak_flop_per_s"] = peak
    result["step_seconds"] = result["seconds_reuse"]
    result["mfu"] = result["model_flops_reuse"] / result["seconds_reuse"] / peak
    result["reuse_speedup"] = result["items_per_s_reuse"] / result["items_per_s_no_reuse"]
    peak_bytes = memory.peak_bytes(device)
    result["peak_memory_gib"] = peak_bytes / 2**30 if peak_bytes is not None else None
    del network, scorer
    memory.release(device)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --quick: CI)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: the same code in under a minute")
    parser.add_argument("--batch-tokens", type=int, default=None, help="token budget of one batch (b)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.time()
    budget = args.batch_tokens or (4096 if args.quick else 32768)
    document: dict[str, Any] = {
        "command": " ".join(["python loadtests/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
                    "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None},
    }
    parts = {
        "kernel": lambda: check_attention(device),
        "exactness": lambda: check_exactness(device, args.quick),
        "grpo": lambda: check_grpo(device, args.quick, budget),
        "oom": lambda: asyncio.run(check_oom(serve(
            "random-oom", random_model(tiny.TINY_SHAPE if args.quick else SHAPE_1_7B, device,
                                       torch.bfloat16 if device.type == "cuda" else torch.float32),
            device, "auto", kernel=kernel_for(device), **SCORER_OPTIONS), device)),
    }
    failed = []
    for name, part in parts.items():
        try:
            document[name] = part()
        except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
            traceback.print_exc()
            failed.append(name)
            document[name] = {"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
            memory.release(device)
        document["oom_recovered"] = document.get("oom", {}).get("oom_recovered", False)
        document["failed"] = failed
        document["wall_seconds"] = time.time() - started
        _write(args.out, document)
    print(table(document))
    if failed:
        sys.exit(1)


def _write(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def table(document: dict[str, Any]) -> str:
    """The figures as a markdown table (a failed part shows its error)."""
    rows: list[tuple[str, str]] = []
    for name in ("kernel", "exactness", "grpo", "oom"):
        if "error" in document.get(name, {}):
            rows.append((f"{name} FAILED", document[name]["error"]))
    k, e, g = document.get("kernel", {}), document.get("exactness", {}), document.get("grpo", {})
    if "contract" in k:
        rows.append(("attention kernel (contract checked)", k["kernel"] + ("+FA3" if k["fa3"] else "")))
    if "max_abs_diff" in e:
        rows += [("(a) max_abs_diff bf16 packed vs fp32 plain", f"{e['max_abs_diff']:.4f}"),
                 ("(a) mean_abs_diff", f"{e['mean_abs_diff']:.4f}"),
                 ("(a) best-of-N agreement", f"{e['best_of_n_agreement']:.2f}")]
    if "mfu" in g:
        rows += [("(b) items/s with reuse", f"{g['items_per_s_reuse']:.1f}"),
                 ("(b) items/s without reuse", f"{g['items_per_s_no_reuse']:.1f}"),
                 ("(b) reuse speed-up", f"{g['reuse_speedup']:.2f}"),
                 ("(b) MFU (vs measured GEMM peak)", f"{g['mfu']:.3f}"),
                 ("(b) GRPO step seconds", f"{g['step_seconds']:.2f}"),
                 ("(b) peak memory GiB", "-" if g["peak_memory_gib"] is None else f"{g['peak_memory_gib']:.1f}")]
    rows.append(("(c) oom_recovered", str(document["oom_recovered"])))
    return "\n".join(["| check | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


if __name__ == "__main__":
    main()
