"""The assertion that applies the tolerance rule; the table itself is ``qwenvl.tolerances.TOLERANCES``
(one table, shared with ``qwenvl verify``), whose docstring states the rule and the measured tails.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from qwenvl.tolerances import TOLERANCES, Tolerance, judge, reference_dtype, tolerance

__all__ = ["Tolerance", "TOLERANCES", "tolerance", "reference_dtype", "assert_close_by_rule", "PARITY_ROWS"]


# Rows of (labels, error, bound) collected by assert_close_by_rule when asked to; conftest writes them out.
PARITY_ROWS: list[dict[str, Any]] = []


def assert_close_by_rule(
    out: torch.Tensor,
    out_ref: torch.Tensor,
    out_pt: torch.Tensor | Sequence[torch.Tensor],
    *,
    k: float,
    name: str,
    draw: Any = None,
    record: dict[str, Any] | None = None,
    zero_atol: float | None = None,
) -> None:
    """Assert ``out`` is within ``k`` times plain-PyTorch error of ``out_ref`` (``qwenvl.tolerances.judge``).

    ``out_pt``: the plain computation in the test dtype, or several (the largest error counts). ``record``
    (labels such as backend and dtype) adds a row to ``PARITY_ROWS`` for the parity report, whether or not
    the check passes.
    """
    verdict = judge(out, out_ref, out_pt, k=k, zero_atol=zero_atol)
    if record is not None:
        PARITY_ROWS.append({**record, "name": name, "err": verdict.err, "bound": verdict.bound})
    if not verdict.passed:
        raise AssertionError(
            f"{name}: max|out - out_ref| = {verdict.err:.3e} > bound {verdict.bound:.3e} = {verdict.how}\ndraw: {draw}"
        )
