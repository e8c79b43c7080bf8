"""The assertion that applies the tolerance rule; the table itself is ``qwenvl.tolerances.TOLERANCES``
(one table, shared with ``qwenvl verify``), whose docstring states the rule and the measured tails.
"""

from __future__ import annotations

from typing import Any

import torch

from qwenvl.tolerances import TOLERANCES, Tolerance, reference_dtype, rounding_floor, tolerance

__all__ = ["Tolerance", "TOLERANCES", "tolerance", "reference_dtype", "assert_close_by_rule", "PARITY_ROWS"]


# Rows of (labels, error, bound) collected by assert_close_by_rule when asked to; conftest writes them out.
PARITY_ROWS: list[dict[str, Any]] = []


def assert_close_by_rule(
    out: torch.Tensor,
    out_ref: torch.Tensor,
    out_pt: torch.Tensor,
    *,
    k: float,
    name: str,
    draw: Any = None,
    record: dict[str, Any] | None = None,
    zero_atol: float | None = None,
) -> None:
    """Assert ``out`` is within ``k`` times plain-PyTorch error of ``out_ref`` (see module docstring).

    ``out_pt`` sets the test dtype. ``zero_atol`` is used only when ``out_ref`` and ``out_pt`` are both
    identically zero. ``record`` (labels such as backend and dtype) adds a row to ``PARITY_ROWS`` for the
    parity report, whether or not the check passes.
    """
    if out.shape != out_ref.shape or out_pt.shape != out_ref.shape:
        shapes = [tuple(t.shape) for t in (out, out_ref, out_pt)]
        raise AssertionError(f"{name}: shapes of out, out_ref, out_pt differ: {shapes}")
    if out_ref.numel() == 0:
        return
    dtype = out_pt.dtype
    ref64 = out_ref.detach().double()
    err = (out.detach().double() - ref64).abs().max().item()
    pt_err = (out_pt.detach().double() - ref64).abs().max().item()
    floor = rounding_floor(out_ref, dtype)
    bound = k * pt_err + floor
    how = f"{k} * max|out_pt - out_ref| ({pt_err:.3e}) + floor ({floor:.3e})"
    if zero_atol is not None and not ref64.any() and not out_pt.detach().any():
        bound, how = zero_atol, "zero_atol (out_ref and out_pt identically zero)"
    if record is not None:
        PARITY_ROWS.append({**record, "name": name, "err": err, "bound": bound})
    if not err <= bound:  # also catches NaN
        raise AssertionError(
            f"{name}: max|out - out_ref| = {err:.3e} > bound {bound:.3e} = {how} [{dtype}]\ndraw: {draw}"
        )
