"""The built wheel verifies itself: build it, install it into a fresh virtualenv, run ``qwenvl verify`` from
outside the checkout. Catches a subpackage or data file missing from the wheel (an editable install hides
both).

The fresh virtualenv gets the wheel and nothing else of ours; torch and transformers come from the running
interpreter's site-packages through a ``.pth`` line (a plain path: the editable install's own ``.pth`` hooks
there are not run, so the checkout cannot leak in).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd, cwd, env=None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _tracked_files() -> list[Path]:
    """The checkout's files that git does not ignore, tracked or not: what a clean clone builds from once they are
    committed (CI's clean clone has only committed ones; a copy of the tree whose git index is older than its
    files, as on the GPU machines, still builds all of them)."""
    out = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    return [Path(name) for name in out.split("\0") if name]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the tracked files: no leftovers of the checkout's build/ reach the wheel, and two
    # xdist workers never build in the same folder.
    source = tmp / "source"
    for name in _tracked_files():
        if os.path.lexists(source / name):  # a link's folder already made for a path through it
            continue
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name, follow_symlinks=False)  # reference/, fixtures/: links
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("qwenvl-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel, cwd=tmp)
    fresh_site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).strip())
    # The test environment's packages, as this process sees them (its site-packages and whatever a .pth or
    # PYTHONPATH added: the nox GPU session reaches the machine's torch that way), never the checkout's own
    # source folders (a nox virtualenv inside the checkout is still the environment).
    def is_environment(path: str) -> bool:
        resolved = Path(path).resolve()
        return resolved.is_dir() and (not resolved.is_relative_to(ROOT) or "site-packages" in resolved.parts)

    deps = [p for p in dict.fromkeys([*site.getsitepackages(), *sys.path]) if p and is_environment(p)]
    (fresh_site / "_qwenvl_test_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env_dir, env, tmp


def test_wheel_holds_every_package(wheel_env):
    env_dir, env, tmp = wheel_env
    found = _run(
        env_dir / "bin" / "python",
        "-c",
        "import pkgutil, qwenvl; print(qwenvl.__file__); "
        "print('\\n'.join(m.name for m in pkgutil.walk_packages(qwenvl.__path__, 'qwenvl.') if m.ispkg))",
        cwd=tmp,
        env=env,
    ).split()
    assert Path(found[0]).is_relative_to(env_dir), f"qwenvl imported from {found[0]}, not the wheel"
    in_checkout = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qwenvl").rglob("__init__.py")}
    in_checkout -= {"qwenvl"}
    assert in_checkout <= set(found[1:]), f"missing from the wheel: {sorted(in_checkout - set(found[1:]))}"


@pytest.mark.slow
def test_wheel_runs_qwenvl_verify_outside_the_checkout(wheel_env):
    env_dir, env, tmp = wheel_env
    report = tmp / "report.json"
    out = _run(env_dir / "bin" / "qwenvl", "verify", "--json", report, cwd=tmp, env=env)
    data = json.loads(report.read_text())
    assert data["passed"] and data["cases"], out
    assert {c["family"] for c in data["cases"]} >= {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}


def test_wheel_holds_every_fixture_file(wheel_env):
    env_dir, env, tmp = wheel_env
    installed = Path(_run(env_dir / "bin" / "python", "-c", "import qwenvl.fixtures as f; print(f.__path__[0])", cwd=tmp, env=env).strip())
    wanted = {p.relative_to("qwenvl/fixtures") for p in _tracked_files() if p.parts[:2] == ("qwenvl", "fixtures")}
    missing = sorted(str(p) for p in wanted if not (installed / p).is_file())
    assert not missing, f"fixture files missing from the wheel (pyproject package-data): {missing[:10]}"


@pytest.mark.slow
def test_wheel_runs_qwenvl_train_on_the_embedded_default(wheel_env):
    pytest.importorskip("accelerate", reason="the Trainer needs the 'train' extra (accelerate)")
    env_dir, env, tmp = wheel_env
    out = tmp / "train-out"
    _run(env_dir / "bin" / "qwenvl", "train", "--output_dir", out, "--max_steps", "2", cwd=tmp, env=env)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
