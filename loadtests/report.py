"""Benchmark output: the issue's targets, bench.json, bench.png and the markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = {  # name: (what, target, higher is better)
    "grpo_items_c_over_a": ("GRPO items/s, (c) / (a)", 2.0, True),
    "grpo_items_c_over_b": ("GRPO items/s, (c) / (b)", 1.6, True),
    "padding_ratio_c": ("padding ratio of (c)'s batches, worst workload mean", 0.05, False),
    "compute_efficiency_c": ("compute efficiency of (c), GRPO", 0.6, True),
    "p99_over_p50_half_rate": ("p99 / p50 latency at half of (c)'s GRPO throughput", 3.0, False),
    "grpo_share_of_reuse_ceiling": ("GRPO ((c) / plain in-process loop) / reuse ceiling", 0.9, True),
}


def targets(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the issue with the measured value and whether it is met."""
    w = document["workloads"]
    values = {
        "grpo_items_c_over_a": w["grpo"]["ratios"]["c/a"],
        "grpo_items_c_over_b": w["grpo"]["ratios"]["c/b"],
        "padding_ratio_c": max(x["contenders"]["c"]["padding_ratio"]["mean"] for x in w.values()),
        "compute_efficiency_c": w["grpo"]["contenders"]["c"]["compute_efficiency"],
        "p99_over_p50_half_rate": document["half_rate"]["p99_over_p50"],
        "grpo_share_of_reuse_ceiling": w["grpo"]["share_of_ceiling"],
    }
    out = {}
    for name, (what, goal, higher) in TARGETS.items():
        value = values[name]
        out[name] = {"what": what, "value": round(value, 4), "target": goal,
                     "met": value >= goal if higher else value <= goal}
    return out


def table(document: dict[str, Any]) -> str:
    """The results as a markdown table, then the half-rate run and the targets."""
    lines = ["| workload | contender | items/s | tokens/s | p50 s | p95 s | p99 s | padding | GFLOP/s | efficiency |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, workload in document["workloads"].items():
        for key, r in workload["contenders"].items():
            lat = r["latency_s"]
            lines.append(
                f"| {name} | ({key}) | {r['items_per_s']:.2f} | {r['tokens_per_s']:.0f} | {lat['p50']:.2f} | "
                f"{lat['p95']:.2f} | {lat['p99']:.2f} | {r['padding_ratio']['mean']:.3f} | "
                f"{r['model_gflop_per_s']:.1f} | {r['compute_efficiency']:.2f} |")
    lines.append("")
    lines.append("| workload | (c)/(a) items/s | (c)/(b) items/s | (c)/loop | reuse ceiling | share of ceiling "
                 "| max abs score diff (a) vs (c), (b) vs (c) |")
    lines.append("|---|---:|---:|---:|---:|---:|---|")
    for name, workload in document["workloads"].items():
        diff, ratios = workload["max_abs_score_diff"], workload["ratios"]
        lines.append(f"| {name} | {ratios['c/a']:.2f} | {ratios['c/b']:.2f} | {ratios['c/loop']:.2f} | "
                     f"{workload['reuse_ceiling']:.2f} | {workload['share_of_ceiling']:.2f} | "
                     f"{_num(diff['a'])}, {_num(diff['b'])} |")
    half = document["half_rate"]
    lines.append("")
    lines.append(f"Half rate ({half['rate_items_per_s']:.2f} items/s open-loop, {half['items']} GRPO items, (c)): "
                 f"p50 {half['p50_s']:.2f} s, p99 {half['p99_s']:.2f} s, p99/p50 {half['p99_over_p50']:.2f}.")
    lines.append("")
    lines.append("| target | measured | goal | met |")
    lines.append("|---|---:|---:|---|")
    for t in document["targets"].values():
        sign = ">=" if t["what"].startswith(("GRPO", "compute")) else "<="
        lines.append(f"| {t['what']} | {t['value']:.3f} | {sign} {t['target']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def write(out: Path, document: dict[str, Any]) -> None:
    """bench.json and bench.png under ``out``."""
    (out / "bench.json").write_text(json.dumps(document, indent=2) + "\n")
    chart(document, out / "bench.png")


def chart(document: dict[str, Any], path: Path) -> None:
    """Items/s per workload and contender, and GRPO latency percentiles (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(document["workloads"])
    keys = ["a", "b", "c"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for i, key in enumerate(keys):
        values = [document["workloads"][w]["contenders"][key]["items_per_s"] for w in workloads]
        left.bar([x + (i - 1) * width for x in range(len(workloads))], values, width,
                 label=f"({key}) {document['contenders'][key]}")
    left.set_xticks(range(len(workloads)), workloads)
    left.set_ylabel("items/s (higher is better)")
    left.set_ylim(0, left.get_ylim()[1] * 1.35)  # room for the legend above the bars
    left.legend(fontsize=7, loc="upper left")
    grpo = document["workloads"]["grpo"]["contenders"]
    for i, q in enumerate(["p50", "p95", "p99"]):
        right.bar([x + (i - 1) * width for x in range(len(keys))], [grpo[k]["latency_s"][q] for k in keys],
                  width, label=q)
    right.set_xticks(range(len(keys)), [f"({k})" for k in keys])
    right.set_ylabel("GRPO latency, s (64 clients)")
    right.legend(fontsize=7)
    fig.suptitle(f"CodeScaler Serve side by side, {document['model']['non_embedding_params'] / 1e6:.0f}M "
                 f"non-embedding params, fp32, {document['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
