"""Every command and snippet of README.md, run as written.

- ``python`` blocks are executed, each in a fresh namespace, in a scratch folder (the JAX one in the checkout,
  where its relative ``fixtures/golden`` path points); a block that needs an optional package it cannot import
  is skipped naming it.
- ``bash`` blocks are split at ``&&``: each ``qwenvl ...`` command runs for real (the console script of this
  environment, in a scratch folder); each ``pip install`` must already hold in this environment (the nox session
  that runs this test installed exactly that), and ``nox -t ci`` is what ``.ci/run`` runs: the README's command
  and CI's are compared, not nested.
- ``json`` blocks are data rows: they pass the data checks with their media in place.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.S | re.M)


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCKS if kind == lang]


def _id(body: str) -> str:
    return body.strip().splitlines()[0][:60]


def test_the_readme_has_the_blocks_this_test_knows():
    assert {kind for kind, _ in BLOCKS} <= {"python", "bash", "json"}, "a new kind of block: teach this test to run it"
    assert len(_blocks("python")) >= 4 and len(_blocks("bash")) >= 3


@pytest.mark.parametrize("body", _blocks("python"), ids=_id)
def test_python_snippet_runs_as_written(body, tmp_path, monkeypatch, capsys):
    for module in re.findall(r"^\s*(?:from|import) (\w+)", body, flags=re.M):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the snippet imports {module}, which is not installed here")
    if "jax" in body:  # qwenvl.reference.jax_attention imports jax when called
        pytest.importorskip("jax", reason="the JAX snippet needs the 'jax' extra (nox -s jax runs it)")
    if "Trainer" in body:
        pytest.importorskip("accelerate", reason="the Trainer needs the 'train' extra (accelerate)")
    monkeypatch.chdir(ROOT if "fixtures/golden" in body else tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(body, "README.md", "exec"), namespace)
    from qwenvl.patches import active_patch

    assert active_patch() is None, "a snippet left a patch applied"
    if re.search(r"^trainer\.train\(\)", body, flags=re.M):
        assert "trainable parameters:" in capsys.readouterr().out
        assert namespace["trainer"].state.global_step == 2
    if "create_optimizer" in body:
        lrs = {g["name"]: g["lr"] for g in namespace["optimizer"].param_groups}
        assert {lr for name, lr in lrs.items() if name.startswith("projector")} == {1e-4}
        assert {lr for name, lr in lrs.items() if name.startswith("vision")} == {2e-6}


def _commands() -> list[str]:
    return [part.strip() for body in _blocks("bash") for line in body.splitlines() for part in line.split("&&") if part.strip()]


def test_every_readme_command_is_one_this_test_runs():
    known = ("python3 -m pip install ", "qwenvl ", "nox ")
    assert all(cmd.startswith(known) for cmd in _commands()), [c for c in _commands() if not c.startswith(known)]


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    nox = [cmd for cmd in _commands() if cmd.startswith(("nox ", "python3 -m pip install nox"))]
    assert nox and " && ".join(nox) in ci


@pytest.mark.parametrize("cmd", [c for c in _commands() if c.startswith("python3 -m pip install ") and "nox" not in c])
def test_readme_installs_hold_here(cmd):
    from importlib.metadata import version

    for requirement in (r for r in shlex.split(cmd)[4:] if r != "-e"):
        if requirement.startswith("torch=="):
            import torch

            if torch.version.cuda is None:  # the CPU suite's torch is the README's; a GPU machine brings its own
                assert torch.__version__.split("+")[0] == requirement.split("==")[1]
        elif requirement.startswith("."):
            import qwenvl

            assert Path(qwenvl.__file__).resolve().is_relative_to(ROOT), "qwenvl is not this checkout (pip install -e .)"
            for extra in re.findall(r"\[(.*)\]", requirement)[0].split(",") if "[" in requirement else []:
                assert extra == "train" and version("accelerate") and version("peft")
        else:
            raise AssertionError(f"unknown install in the README: {requirement}")


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [c for c in _commands() if c.startswith("qwenvl ")])
def test_readme_qwenvl_command_runs(cmd, tmp_path):
    if " train" in cmd:
        pytest.importorskip("accelerate", reason="the Trainer needs the 'train' extra (accelerate)")
    exe = shutil.which("qwenvl", path=str(Path(sys.executable).parent))
    assert exe, "the qwenvl console script is not installed beside this python"
    done = subprocess.run([exe, *shlex.split(cmd)[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if cmd.startswith("qwenvl verify"):
        assert json.loads((tmp_path / "qwenvl-verify.json").read_text())["passed"]
    if cmd.startswith("qwenvl train"):
        out = tmp_path / shlex.split(cmd)[shlex.split(cmd).index("--output_dir") + 1]
        assert (out / "model.safetensors").is_file() and "trainable parameters:" in done.stdout


@pytest.mark.parametrize("body", _blocks("json"), ids=_id)
def test_json_rows_pass_the_data_checks(body, tmp_path):
    from qwenvl.data import check_rows
    from qwenvl.fixtures import demo_data_path

    rows = json.loads(body)
    for row in rows:
        for path in [row["image"]] if isinstance(row.get("image"), str) else row.get("image", []):
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(next((demo_data_path().parent / "images").glob("*.png")), tmp_path / path)
    data = tmp_path / "train.json"
    data.write_text(body)
    assert check_rows(str(data)) == []
