"""nox sessions. `nox -t ci` is what CI runs (README: "Run the tests").

Versions come from pyproject.toml ([tool.qwenvl]): the transformers release matrix and the CPU torch wheel.
Every session that installs the project installs it under `locks/tf-<release>.txt`: the exact versions of
everything the tests import, so a new release of a test library cannot change what CI runs. `nox -s lock`
writes those files again from what the registry serves today (then run `nox -t ci` and commit them).
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
_CONFIG = nox.project.load_toml(ROOT / "pyproject.toml")["tool"]["qwenvl"]
MATRIX = _CONFIG["transformers-matrix"]
TORCH_CPU = _CONFIG["torch-cpu"]
OLDEST, NEWEST = MATRIX[0], MATRIX[-1]
LOCK_EXTRAS = "test,train"


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


def _tests(session: nox.Session, *, transformers: str, paths: list[str], extras: str = "test") -> None:
    _install(session, transformers=transformers, extras=extras)
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", *paths, *session.posargs)


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
    """Model, data and trainer parity tests on one transformers release (`nox -s "parity(tf-5.0.0)"`)."""
    _tests(
        session,
        transformers=transformers,
        paths=[
            "parity_tests/test_models.py",
            "parity_tests/test_ordinary_calls.py",
            "parity_tests/test_optimizer_groups.py",
            "parity_tests/test_trainer.py",
            "parity_tests/test_data_packing.py",
            "parity_tests/test_dataset.py",
            "parity_tests/test_fixture_models.py",
            "parity_tests/test_train_cli.py",
        ],
    )


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """The suite on CUDA (bf16/fp16 against the torch and sdpa backends). Needs a CUDA torch already installed."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "--device", "cuda", "parity_tests", *session.posargs)


@nox.session(default=False)
def jax(session: nox.Session) -> None:
    """The JAX twin of the reference checked against the torch reference."""
    _install(session, transformers=NEWEST, extras="test,jax")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "parity_tests/test_masks.py", *session.posargs)


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


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Kernel benchmark (CUDA): prints a table and writes JSON."""
    session.install("-e", ".")
    session.run("python", "benchmarks/attention_bench.py", "--out", "bench-attention.json", *session.posargs)
