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


def test_the_linear_extra_brings_what_flas_backward_needs_on_hopper():
    """fla_problem() sends a Hopper user with Triton < 3.7.1 to tilelang: the `linear` extra must install it there
    (Linux x86_64, where its wheels are), so `pip install 'qwenvl[linear]'` trains with fla's backward."""
    import tomllib

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requirements = {Requirement(r).name: Requirement(r) for r in extras["linear"]}
    assert {"fla-core", "flash-linear-attention", "tilelang"} <= requirements.keys()
    linux = {**default_environment(), "platform_system": "Linux", "platform_machine": "x86_64"}
    assert requirements["tilelang"].marker.evaluate(linux)
    assert not requirements["tilelang"].marker.evaluate({**linux, "platform_system": "Darwin"})
