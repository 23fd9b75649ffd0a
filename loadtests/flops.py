"""Model FLOPs of a benchmark workload: what each contender really ran, and the reuse ceiling.

2 * N_nonembedding per token run, plus 4 * layers * heads * head_dim per attended
(query, key) pair; the ceiling is the FLOPs of every item run whole over those with
each problem's prefix run once.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from collections.abc import Hashable, Iterable
from typing import Any

import torch

from loadtests.workloads import Workload
from models import tiny


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


def forward_flops(items: Iterable[tuple[Hashable, int, int]], params: int, pair: int, reuse: bool) -> float:
    """FLOPs of scoring ``items``, each (problem, length, prefix length): whole, or each prefix once.

    ``pair`` is the FLOPs of one attended (query, key) pair (4 x layers x heads x head_dim);
    with ``reuse`` a problem's prefix runs once and each suffix attends to it and to itself.
    """
    total, seen = 0.0, set()
    for problem, length, prefix in items:
        if not reuse:
            total += 2 * params * length + pair * length * (length + 1) / 2
            continue
        if problem not in seen:
            seen.add(problem)
            total += 2 * params * prefix + pair * prefix * (prefix + 1) / 2
        own = length - prefix
        total += 2 * params * own + pair * own * (prefix + (own + 1) / 2)
    return total


def reuse_ceiling(workload: Workload, facts: dict[str, Any]) -> float:
    """FLOPs of every item run whole over FLOPs with each problem's prefix run once."""
    items = [(problem, length, prefix) for request in workload.requests
             for (problem, _), length, prefix in zip(request.items, request.lengths, request.prefix_lengths,
                                                     strict=True)]
    n, pair = facts["non_embedding_params"], facts["flops_per_attention_pair"]
    return forward_flops(items, n, pair, reuse=False) / forward_flops(items, n, pair, reuse=True)
