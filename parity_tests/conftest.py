"""Shared pytest setup: hypothesis profiles, the ``--device`` option, the ``gpu`` marker, the parity report.

Profiles (pick with ``HYPOTHESIS_PROFILE``, default ``ci``):
    dev  few examples, for iterating locally;
    ci   derandomized so every run draws the same examples, no deadline, failing blobs printed.

``QWENVL_PARITY_REPORT=path.json`` writes the (backend, dtype, error, bound) rows that the attention parity
tests record; ``scripts/parity_report_to_md.py`` turns that file into the table in docs/gpu-parity.md.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import tolerances

settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci",
    max_examples=50,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _share_the_cores() -> None:
    """Give each pytest-xdist worker its share of the cores as intra-op threads, and the processes it starts the
    same share through OMP_NUM_THREADS (set, not defaulted: workers inherit the controller's value). Left at
    torch's default, 2 workers each spin 2 threads on 2 cores, and the tiny models' steps ran 30-50x slower than
    alone (measured: a Qwen3.5 parity test 9.7 s alone, 283 s in the suite).
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores()
# The data length cache of the tests' datasets goes to a scratch folder, never the user's ~/.cache.
os.environ.setdefault("QWENVL_CACHE_DIR", tempfile.mkdtemp(prefix="qwenvl-test-cache-"))
# JAX takes 75% of the GPU's memory when it first starts on one: with six workers sharing an H200, the worker that
# ran a JAX test left the others 3 MiB (every torch test after it ran out of memory). Allocate as needed instead;
# set before any test imports jax, and inherited by the processes tests start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_REPORT_ENV = "QWENVL_PARITY_REPORT"
_WORKER_KEY = "qwenvl_parity_rows"


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="device for the parity tests; 'cuda' also runs the tests marked gpu",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda was given but torch.cuda.is_available() is False")
    return torch.device(name)


def pytest_collection_modifyitems(config, items):
    import transformers

    from qwenvl.families import FAMILIES

    cpu_only = config.getoption("--device") != "cuda"
    skip_gpu = pytest.mark.skip(reason="needs CUDA: run with --device cuda")
    for item in items:
        if cpu_only and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        # A family the installed transformers release does not have (Qwen3.5 before 5.2) is skipped, saying so.
        family = getattr(item, "callspec", None) and item.callspec.params.get("family")
        spec = FAMILIES.get(family) if isinstance(family, str) else None
        if spec is not None and not spec.available():
            item.add_marker(
                pytest.mark.skip(reason=f"transformers {transformers.__version__} has no {family} (from {spec.min_transformers})")
            )
    # The modules holding slow tests first (a stable sort: every module stays whole, so a module-scoped fixture is
    # built once, and keeps its order), so xdist starts them at once on its workers instead of leaving the longest
    # for last (the CUDA suite on an H100: 906 s of tests on 6 workers took 240 s, the wheel and README runs of
    # 76-86 s starting near the end).
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)


def _aggregate(rows):
    """One row per (test, backend, device, dtype, quantity): examples seen, worst error and its bound."""
    groups = defaultdict(list)
    for row in rows:
        key = (row["test"], row["backend"], row["device"], row["dtype"], row["name"])
        groups[key].append(row)
    table = []
    for (test, backend, device, dtype, name), group in sorted(groups.items()):
        worst = max(group, key=lambda r: r["err"] / r["bound"] if r["bound"] > 0 else float("inf"))
        table.append(
            {
                "test": test,
                "backend": backend,
                "device": device,
                "dtype": dtype,
                "quantity": name,
                "examples": len(group),
                "max_err": max(r["err"] for r in group),
                "worst_err": worst["err"],
                "worst_bound": worst["bound"],
                "worst_ratio": worst["err"] / worst["bound"] if worst["bound"] > 0 else None,
            }
        )
    return table


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    # xdist controller: gather what each worker recorded.
    rows = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
    if rows:
        tolerances.PARITY_ROWS.extend(json.loads(rows))


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(_REPORT_ENV)
    if not path:
        return
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[_WORKER_KEY] = json.dumps(tolerances.PARITY_ROWS)
        return
    device = session.config.getoption("--device")
    on_cuda = device == "cuda" and torch.cuda.is_available()
    report = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
        "hypothesis_profile": os.environ.get("HYPOTHESIS_PROFILE", "ci"),
        "rows": _aggregate(tolerances.PARITY_ROWS),
    }
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


@pytest.fixture(autouse=True)
def _no_leftover_patch():
    """Every test starts and ends unpatched; one that leaks a patch fails and is cleaned up after."""
    from qwenvl.patches import active_patch

    assert active_patch() is None, "a previous test left a patch active"
    yield
    applied = active_patch()
    if applied is not None:
        import qwenvl.patches

        applied.recorder.undo()
        qwenvl.patches._ACTIVE = None
        pytest.fail("the test left a patch active")
