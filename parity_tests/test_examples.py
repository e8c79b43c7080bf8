"""The examples run as written (a subprocess, as a user would start them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("accelerate", reason="the Trainer needs the 'train' extra (accelerate)")


@pytest.mark.slow
def test_train_packed_images_example():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_packed_images.py"), "--steps", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = [line for line in proc.stdout.splitlines() if "packed loss = samples alone" in line]
    from qwenvl.families import FAMILIES

    assert sorted(line.split(":")[0] for line in done) == sorted(FAMILIES), proc.stdout[-3000:]
