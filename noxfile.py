"""nox sessions. `nox -t ci` is what CI runs (README: "Run the tests").

Versions come from pyproject.toml ([tool.qwenvl]): the transformers release matrix and the CPU torch wheel.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

_CONFIG = tomllib.loads((Path(__file__).parent / "pyproject.toml").read_text())["tool"]["qwenvl"]
MATRIX = _CONFIG["transformers-matrix"]
TORCH_CPU = _CONFIG["torch-cpu"]
OLDEST, NEWEST = MATRIX[0], MATRIX[-1]


def _install(session: nox.Session, *, transformers: str, extras: str = "test") -> None:
    # torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
    session.install(f"torch=={TORCH_CPU}")
    session.install("-e", f".[{extras}]", f"transformers=={transformers}")


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
    """Model parity and trainer tests on one transformers release (`nox -s "parity(tf-5.0.0)"`)."""
    _tests(
        session,
        transformers=transformers,
        paths=["parity_tests/test_models.py", "parity_tests/test_optimizer_groups.py", "parity_tests/test_trainer.py"],
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
def verify(session: nox.Session) -> None:
    """`qwenvl verify` on any release: `nox -s verify -- 5.17.0`."""
    version = session.posargs[0] if session.posargs else NEWEST
    _install(session, transformers=version, extras="test")
    session.run("qwenvl", "verify", "--json", f"qwenvl-verify-{version}.json")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Kernel benchmark (CUDA): prints a table and writes JSON."""
    session.install("-e", ".")
    session.run("python", "benchmarks/attention_bench.py", "--out", "bench-attention.json", *session.posargs)
