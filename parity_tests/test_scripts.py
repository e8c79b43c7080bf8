"""The benchmark and maintenance scripts: each answers ``--help``, and the plot draws what the benchmark wrote."""

from __future__ import annotations

import json
from pathlib import Path
import re
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for folder in ("benchmarks", "scripts") for p in (ROOT / folder).glob("*.py") if "argparse" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_answers_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:300]


def test_the_plot_has_a_bar_per_measured_row_and_says_why_it_cannot(tmp_path):
    result = json.loads((ROOT / "docs/results/model-syncs-h100-run1.json").read_text())
    result["rows"].append({"model": "qwen3_vl", "mix": "mixed", "method": "broken", "error": "OOM"})
    source = tmp_path / "step.json"
    source.write_text(json.dumps(result))
    out = tmp_path / "plot.svg"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/plot_step.py"), str(source), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    svg = out.read_text()
    measured = [r for r in result["rows"] if "ms" in r]
    assert len(re.findall(r'<rect x="170"', svg)) == len(measured) == 8
    fastest = max(measured, key=lambda r: r["tokens_per_s"])
    assert f"{fastest['ms']:.0f} ms" in svg and "broken" not in svg and result["gpu"] in svg
    source.write_text(json.dumps({**result, "rows": []}))
    done = subprocess.run([sys.executable, str(ROOT / "scripts/plot_step.py"), str(source), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no measured rows" in done.stderr
