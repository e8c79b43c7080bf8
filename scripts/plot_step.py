"""The plot of ``benchmarks/model_step.py``'s JSON: one panel per (model, mix), a bar per method, as an SVG.

Each bar is the step's tokens per second (longer is faster), labelled with its step time, its MFU and its host
syncs; the GPU, the text depth and the releases go in the title. No plotting library: the SVG is written by hand,
so the script runs wherever the benchmark's JSON is (CI included)::

    python scripts/plot_step.py docs/results/model-syncs-h100-run1.json -o docs/plots/model-step.svg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
from xml.sax.saxutils import escape

BAR, GAP, LABEL, WIDTH, CHART = 18, 6, 170, 900, 430  # px: bar height, gap, method column, total width, bar area


def panels(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The measured rows by (model, mix), in the JSON's order; rows that failed are left out."""
    out: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if "ms" in row:
            out.setdefault((row["model"], row["mix"]), []).append(row)
    return out


def render(result: dict) -> str:
    """The SVG text of ``result`` (``model_step.py``'s JSON)."""
    groups = panels(result["rows"])
    if not groups:
        raise ValueError("no measured rows to plot")
    fastest = max(r["tokens_per_s"] for rows in groups.values() for r in rows)
    depth = result.get("text_layers")
    title = (f"{result['gpu']}: one training step, tokens/s (torch {result.get('torch', '?')}, transformers "
             f"{result.get('transformers', '?')}, {'full depth' if depth == 0 else f'{depth} text layers'})")
    parts, y = [], 40
    for (model, mix), rows in groups.items():
        parts.append(f'<text x="10" y="{y}" font-weight="bold">{escape(model)} / {escape(mix)} ({rows[0]["tokens"]} tokens)</text>')
        y += 10
        for row in rows:
            length = max(1.0, CHART * row["tokens_per_s"] / fastest)
            mfu = f", MFU {row['mfu'] * 100:.0f}%" if row.get("mfu") else ""
            label = f"{row['ms']:.0f} ms{mfu}, {row['host_syncs']} syncs"
            parts.append(f'<text x="10" y="{y + BAR - 5}">{escape(row["method"])}</text>')
            parts.append(f'<rect x="{LABEL}" y="{y}" width="{length:.1f}" height="{BAR}" fill="#4878a8"/>')
            parts.append(f'<text x="{LABEL + length + 6:.1f}" y="{y + BAR - 5}">{escape(label)}</text>')
            y += BAR + GAP
        y += 22
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y}" font-family="sans-serif" '
            f'font-size="12"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="10" y="20" font-size="13">{escape(title)}</text>')
    return head + "".join(parts) + "</svg>\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="model_step.py --out file")
    p.add_argument("-o", "--out", required=True, help="the SVG to write")
    args = p.parse_args(argv)
    try:
        result = json.loads(Path(args.json).read_text())
        svg = render(result)
    except (OSError, ValueError, KeyError) as exc:
        print(f"plot_step.py: {args.json}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(svg)
    print(f"wrote {args.out}: {sum(len(r) for r in panels(result['rows']).values())} bars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
