"""The transformers release matrix has one list, ``qwenvl.patches._versions.TESTED_VERSIONS``: nox runs it, every
release on it has its lock, and the goldens are pinned to its newest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qwenvl.patches._versions import TESTED_VERSIONS

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nox_runs_the_one_release_list():
    pytest.importorskip("nox", reason="the noxfile needs nox (the 'test' extra)")
    noxfile = _load(ROOT / "noxfile.py")
    assert noxfile.MATRIX == list(TESTED_VERSIONS)
    assert (noxfile.OLDEST, noxfile.NEWEST) == (TESTED_VERSIONS[0], TESTED_VERSIONS[-1])
    assert "transformers-matrix" not in (ROOT / "pyproject.toml").read_text(), "a second copy of the matrix"


def test_every_release_has_its_lock_and_no_other_lock_is_kept():
    locks = sorted(p.name for p in (ROOT / "locks").glob("*.txt"))
    assert locks == sorted(f"tf-{version}.txt" for version in TESTED_VERSIONS), (
        "locks/ and TESTED_VERSIONS differ: nox -s \"lock(tf-<release>)\" writes a missing one"
    )


def test_the_goldens_are_written_under_the_newest_release():
    assert _load(ROOT / "scripts" / "make_golden.py").pinned_versions()[0] == TESTED_VERSIONS[-1]
