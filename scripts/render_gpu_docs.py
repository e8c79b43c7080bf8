"""Render the tables of docs/gpu-parity.md and docs/benchmarks.md from the JSON that scripts/gpu_run.sh
writes (copied into docs/results/). Prints Markdown; the prose around the tables is written by hand.

    python scripts/render_gpu_docs.py verify docs/results/verify-cuda-h200-tf5.17.json
    python scripts/render_gpu_docs.py bench docs/results/bench-attention-h200.json
"""

from __future__ import annotations

import json
import sys


def verify_table(report: dict) -> str:
    lines = [
        "| family | backend | convention | logits err | bound | worst grad err | bound | pass |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for c in report["cases"]:
        lines.append(
            f"| {c['family']} | {c['backend']} | {c['convention']} | {c['logits_err']:.2e} | {c['logits_bound']:.2e} "
            f"| {c['grad_err']:.2e} | {c['grad_bound']:.2e} | {'PASS' if c['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def bench_tables(report: dict) -> str:
    rows = report["rows"]
    lines = [
        "| tokens | docs | kv heads | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for x in rows:
        lines.append(
            f"| {x['tokens']} | {x['docs']} | {x['kv_heads']} | {x['method']} | {x['fwd_ms']:.3f} | {x['fwd_tflops']:.0f} "
            f"| {x['fwd_bwd_ms']:.3f} | {x['fwd_bwd_tflops']:.0f} |"
        )
    by = {(x["tokens"], x["docs"], x["kv_heads"], x["method"]): x for x in rows}
    ratio = ["| tokens | docs | kv heads | entry point | fwd | fwd+bwd |", "|---:|---:|---:|---|---:|---:|"]
    for (t, d, k, m), x in by.items():
        raw = by.get((t, d, k, "raw-varlen"))
        if m.startswith("ours-") and m != "ours-sdpa" and raw:
            ratio.append(f"| {t} | {d} | {k} | {m} | {x['fwd_ms'] / raw['fwd_ms']:.2f} | {x['fwd_bwd_ms'] / raw['fwd_bwd_ms']:.2f} |")
    return "\n".join(lines) + "\n\nEntry point vs raw kernel (ratio of medians from the same run, < 1 = ours faster):\n\n" + "\n".join(ratio)


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    data = json.load(open(path))
    print(verify_table(data) if kind == "verify" else bench_tables(data))
