"""docs/contributing.md stays true: every repository path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_path_in_the_contributing_guide_exists():
    text = (ROOT / "docs" / "contributing.md").read_text()
    paths = {p for p in re.findall(r"`([A-Za-z0-9_./-]+/[A-Za-z0-9_./-]*)`", text) if not p.startswith("../")}
    assert len(paths) >= 20
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/contributing.md names paths that do not exist: {missing}"
