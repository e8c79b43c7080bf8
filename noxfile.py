"""nox sessions. `nox -t ci` is what CI runs (README: "Run the tests"); `nox -l` lists every session.

    tests                       the whole CPU suite on the newest tested transformers (ci, default)
    parity(tf-<release>)        model/data/trainer/golden parity on one matrix release (tf-4.57.6 is in ci)
    parity_version -- <release> the same on any release or release candidate (`-- 5.25.0rc1`)
    gpu                         the suite on CUDA (not default)
    jax                         the JAX reference twin and the golden interop test (not default)
    lint                        ruff over qwenvl/ reference/ parity_tests/ scripts/ (not default)
    bench                       kernel benchmark, CUDA (not default)
    mutations                   the mutation catalogue; rewrites its README table (by hand, not in ci)
    golden                      rewrite fixtures/golden/ under the pinned release (not default)
    verify -- <release>         `qwenvl verify` on any release (not default)
    lock(tf-<release>)          rewrite locks/tf-<release>.txt (not default)

The transformers release matrix is qwenvl.patches._versions.TESTED_VERSIONS, read from that file (nox needs no
qwenvl installed); the CPU torch wheel is pyproject.toml's [tool.qwenvl] torch-cpu.
Every session that installs the project installs it under `locks/tf-<release>.txt`: the exact versions of
everything the tests import, so a new release of a test library cannot change what CI runs. `nox -s lock`
writes those files again from what the registry serves today (then run `nox -t ci` and commit them).
"""

from __future__ import annotations

import ast
import site
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
_PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
TORCH_CPU = _PYPROJECT["tool"]["qwenvl"]["torch-cpu"]


def _tested_versions() -> list[str]:
    """``TESTED_VERSIONS`` of qwenvl/patches/_versions.py, read as a literal (importing it would need qwenvl)."""
    module = ast.parse((ROOT / "qwenvl" / "patches" / "_versions.py").read_text())
    for node in module.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["TESTED_VERSIONS"]:
            return list(ast.literal_eval(node.value))
    raise RuntimeError("qwenvl/patches/_versions.py has no TESTED_VERSIONS = (...) line")


MATRIX = _tested_versions()
OLDEST, NEWEST = MATRIX[0], MATRIX[-1]
# Every extra a locked session installs: the locks pin jax and ruff too.
LOCK_EXTRAS = "test,train,jax,lint"
LINT_PATHS = ["qwenvl", "parity_tests", "scripts", "noxfile.py"]  # qwenvl/ holds reference/ and fixtures/
PARITY_PATHS = [
    "parity_tests/test_models.py",
    "parity_tests/test_routing.py",
    "parity_tests/test_ordinary_calls.py",
    "parity_tests/test_optimizer_groups.py",
    "parity_tests/test_trainer.py",
    "parity_tests/test_data_packing.py",
    "parity_tests/test_dataset.py",
    "parity_tests/test_fixture_models.py",
    "parity_tests/test_train_cli.py",
    "parity_tests/test_golden.py",
    "parity_tests/test_distributed.py",
    "parity_tests/test_upstream_dropin.py",
]


def _lock_file(transformers: str) -> Path:
    return ROOT / "locks" / f"tf-{transformers}.txt"


def _install(session: nox.Session, *, transformers: str, extras: str = "test", locked: bool = True) -> None:
    # torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
    session.install(f"torch=={TORCH_CPU}")
    constraints: list[str] = []
    if locked:
        lock = _lock_file(transformers)
        if not lock.exists():
            session.error(f"{lock.relative_to(ROOT)} is missing: run `nox -s \"lock(tf-{transformers})\"` first")
        constraints = ["-c", str(lock)]
    session.install(*constraints, "-e", f".[{extras}]", f"transformers=={transformers}")


def _tests(
    session: nox.Session,
    *,
    transformers: str,
    paths: list[str],
    extras: str = "test",
    locked: bool = True,
    posargs: list[str] | None = None,
) -> None:
    _install(session, transformers=transformers, extras=extras, locked=locked)
    args = session.posargs if posargs is None else posargs
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", *paths, *args)


@nox.session(tags=["ci"])
def tests(session: nox.Session) -> None:
    """The whole CPU suite on the newest tested transformers release."""
    _tests(session, transformers=NEWEST, paths=["parity_tests"])


@nox.session
@nox.parametrize(
    "transformers",
    [nox.param(v, id=f"tf-{v}", tags=["ci"] if v == OLDEST else []) for v in MATRIX],
)
def parity(session: nox.Session, transformers: str) -> None:
    """Model, data, trainer and golden parity tests on one matrix release (`nox -s "parity(tf-5.0.0)"`)."""
    _tests(session, transformers=transformers, paths=PARITY_PATHS)


@nox.session(default=False)
def parity_version(session: nox.Session) -> None:
    """The parity tests on any release or release candidate: `nox -s parity_version -- 5.25.0rc1`.

    Extra arguments go to pytest. A release without a lock installs unlocked; a drift of its outputs against the
    goldens fails test_golden until a person explains it (qwenvl.verify.golden.KNOWN_DRIFT).
    """
    if not session.posargs:
        session.error("give the transformers release: nox -s parity_version -- 5.25.0rc1")
    version, *rest = session.posargs
    _tests(session, transformers=version, paths=PARITY_PATHS, locked=_lock_file(version).exists(), posargs=rest)


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """The suite on CUDA: bf16/fp16 backends, golden and JAX interop on the GPU (uses the machine's CUDA torch).

    The virtualenv sees the packages of the environment nox runs in (a .pth file naming its site-packages; a
    plain --system-site-packages would miss them where that environment is itself a virtualenv, as on images
    that ship torch in one), so the machine's CUDA torch (and JAX, torchvision, a video decoder) are used; the
    project and its test and video (PyAV) extras are installed into it.
    """
    purelib = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    ).strip()
    Path(purelib, "_machine_site.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # No build isolation: the machine's setuptools builds the editable install, so a GPU box without internet
    # (whose packages are all there already) runs the session too.
    session.install("--no-build-isolation", "-e", ".[test,video]")
    # Six workers by default: one H100/H200 holds them, and the whole suite then runs in minutes.
    workers = [] if any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in session.posargs) else ["-n", "6"]
    session.run(
        "python", "-m", "pytest", "-p", "no:cacheprovider", "--device", "cuda", *workers, "parity_tests", *session.posargs
    )


@nox.session(default=False)
def jax(session: nox.Session) -> None:
    """The JAX reference twin against the torch reference, the golden attention inputs through both, and the
    README's snippets (its JAX interop snippet runs only where jax is installed)."""
    _install(session, transformers=NEWEST, extras="test,jax")
    session.run(
        "python", "-m", "pytest", "-p", "no:cacheprovider", "parity_tests/test_masks.py",
        "parity_tests/test_jax_interop.py", "parity_tests/test_readme.py", *session.posargs,
    )


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """ruff over qwenvl/ reference/ parity_tests/ scripts/ (rules: pyproject's [tool.ruff]).

    ruff is the exact pin of the `lint` extra, installed under the newest lock.
    """
    session.install("-c", str(_lock_file(NEWEST)), *_PYPROJECT["project"]["optional-dependencies"]["lint"])
    session.run("ruff", "check", *LINT_PATHS, *session.posargs)


@nox.session(default=False)
def mutations(session: nox.Session) -> None:
    """The mutation catalogue: every planted bug must fail the CPU suite; rewrites the README table (by hand).

    scripts/mutations.py: each mutation is applied to a scratch copy of the package and the tests that should catch
    it run against that copy. Not in ci (it takes a while on 2 cores); `-- --only NAME` runs one mutation.
    """
    _install(session, transformers=NEWEST)
    session.run("python", "scripts/mutations.py", "--readme", "README.md", *session.posargs)


@nox.session(default=False)
def golden(session: nox.Session) -> None:
    """Rewrite fixtures/golden/ under the pinned release (the newest of the matrix) and print what moved.

    `-- --check` writes nothing and fails if anything would move; `-- --family NAME` rewrites one family.
    """
    _install(session, transformers=NEWEST)
    session.run("python", "scripts/make_golden.py", *session.posargs)


@nox.session(default=False)
@nox.parametrize("transformers", [nox.param(v, id=f"tf-{v}") for v in MATRIX])
def lock(session: nox.Session, transformers: str) -> None:
    """Write `locks/tf-<release>.txt` from a fresh install of what the registry serves today."""
    _install(session, transformers=transformers, extras=LOCK_EXTRAS, locked=False)
    frozen = session.run("python", "-m", "pip", "freeze", "--all", "--exclude-editable", silent=True)
    # torch is pinned by [tool.qwenvl] torch-cpu and installed first; the lock holds everything else.
    lines = [line for line in frozen.splitlines() if line and not line.startswith(("#", "torch==", "pip=="))]
    lock = _lock_file(transformers)
    lock.parent.mkdir(exist_ok=True)
    header = f"# nox -s \"lock(tf-{transformers})\": every package the tests import, for transformers {transformers}\n"
    lock.write_text(header + "\n".join(lines) + "\n")
    session.log(f"wrote {lock.relative_to(ROOT)} ({len(lines)} packages)")


@nox.session(default=False)
def verify(session: nox.Session) -> None:
    """`qwenvl verify` on any release: `nox -s verify -- 5.17.0` (an unlocked release installs unlocked)."""
    version = session.posargs[0] if session.posargs else NEWEST
    _install(session, transformers=version, extras="test", locked=_lock_file(version).exists())
    session.run("qwenvl", "verify", "--json", f"qwenvl-verify-{version}.json")


# Issue 19's headline: one training step at the real models' depth, and at 8 text layers for comparison. Each set
# writes bench-step/<set>.json and a plot of it; extra arguments go to every model_step.py run (the upstream row:
# `-- --methods ours ... upstream-4.57 --upstream-site DIR --upstream-checkout DIR`, docs/benchmarks.md).
STEP_SETS = {
    "full-depth": ["--models", "qwen2_5_vl", "qwen3_vl", "--text-layers", "0"],
    "full-depth-7b-8b": ["--models", "qwen2_5_vl_7b", "qwen3_vl_8b", "--text-layers", "0", "--checkpointing"],
    "8-layers": ["--models", "qwen2_5_vl", "qwen3_vl", "--text-layers", "8"],
}
STEP_METHODS = ["ours", "ours+compile", "ours+compile+fusedce", "ours+compile+graphs", "padded"]


@nox.session(name="bench-step", default=False, venv_params=["--system-site-packages"])
def bench_step(session: nox.Session) -> None:
    """One training step of Qwen2.5-VL-3B/-7B and Qwen3-VL-4B/-8B (CUDA, one H100/H200): bench-step/*.json, *.svg."""
    session.install("-e", ".")
    Path("bench-step").mkdir(exist_ok=True)
    for name, args in STEP_SETS.items():
        out = f"bench-step/{name}.json"
        session.run("python", "benchmarks/model_step.py", *args, "--mixes", "images-12x448", "mixed",
                    "--methods", *STEP_METHODS, "--out", out, *session.posargs)
        session.run("python", "scripts/plot_step.py", out, "-o", out.replace(".json", ".svg"))


@nox.session(default=False, venv_params=["--system-site-packages"])
def bench(session: nox.Session) -> None:
    """Kernel benchmark (CUDA, the machine's CUDA torch): prints a table and writes bench-attention.json."""
    session.install("-e", ".")
    session.run("python", "benchmarks/attention_bench.py", "--out", "bench-attention.json", *session.posargs)
