"""Turn the JSON written by ``QWENVL_PARITY_REPORT=path pytest ...`` into a Markdown table.

    QWENVL_PARITY_REPORT=parity-rows.json pytest --device cuda parity_tests/test_attention.py
    python scripts/parity_report_to_md.py parity-rows.json >> docs/gpu-parity.md

One row per (test, backend, device, dtype, quantity): the hypothesis examples seen, the largest error, and
the draw closest to its bound (error, bound, error / bound).
"""

from __future__ import annotations

import argparse
import json
import sys


def to_markdown(report: dict) -> str:
    lines = [
        f"Device: {report.get('device', '?')}, torch {report.get('torch', '?')}, "
        f"hypothesis profile `{report.get('hypothesis_profile', '?')}`.",
        "",
        "| test | backend | device | dtype | quantity | examples | max err | worst err | its bound | err / bound |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        ratio = "n/a" if r["worst_ratio"] is None else f"{r['worst_ratio']:.2f}"
        lines.append(
            f"| {r['test']} | {r['backend']} | {r['device']} | {r['dtype']} | {r['quantity']} | {r['examples']} "
            f"| {r['max_err']:.2e} | {r['worst_err']:.2e} | {r['worst_bound']:.2e} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="parity report JSON -> Markdown table")
    parser.add_argument("report", help="the JSON file written via QWENVL_PARITY_REPORT")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        sys.stdout.write(to_markdown(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
