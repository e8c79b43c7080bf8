"""The one tolerance table, keyed by (device type, dtype), used by the parity tests and ``qwenvl verify``.

The rule (flash-attention's): production error against a float64 (float32 for half dtypes on CUDA)
reference may be at most ``k`` times the error of the same computation done plainly in the test dtype,
plus a rounding floor::

    max|out - out_ref| <= k * max|out_pt - out_ref| + floor
    floor = 2 * max|((out_ref.to(dtype) + 0.3) - 0.3) - out_ref|

The yardstick ``out_pt`` is every plain same-dtype computation of the same maths, and the rule takes the
largest of their errors. For the attention output there are two: the plain softmax, and the fused kernels' way
done plainly (``qwenvl.reference.attention_ref_flash_out``: the scale folded into a base-2 exponent with a fused
multiply-add, normalised last). With one key per query the plain softmax is exactly 1 and its output exactly V,
a yardstick of 0, while the fused way leaves the rounding of ``max * scale * log2(e)`` in the exponent and V
within an ulp or two. On CUDA (compute capability >= 8.0) float32 SDPA runs the memory-efficient kernel, whose
matmuls are 3xTF32 (CUTLASS's ``OpMultiplyAddFastF32``: each operand split into two TF32 halves, about 21
significant bits kept): the same plain computation with that split (``attention_ref_flash_out(tf32x3=True)``)
is the third output yardstick there, and its backward done the same way (``attention_ref_flash_grads(tf32x3=
True)``) the third gradient one. Measured on an H100 (2026-12-07): on a one-key-per-query draw the kernel was
2 ulps (4.8e-7) from V while both float32 yardsticks were exact, a bound of the floor alone (2.4e-7), and its
``dk`` 2.5e-6 from 0 where the float32 yardsticks left 8.9e-8; the 3xTF32 yardsticks stray as far (4.8e-7 on
the output draw). ``test_the_tf32x3_yardsticks_bound_the_memory_efficient_kernel_where_float32_ones_cannot``
holds the kernel to them. For attention gradients there are two as well: autograd through the plain softmax, and
FlashAttention's own backward done plainly (``qwenvl.reference.attention_ref_flash_grads``: probabilities
recomputed from the log-sum-exp, ``dS = P * (dP - rowsum(dO * O))``). They round differently, and which one
is more accurate depends on the draw: with one key per query (a window of (0, 0), length-1 segments)
autograd's softmax backward cancels exactly and leaves a yardstick of 0, while every fused kernel leaves a
few ulps of ``|dO| |V|``; the rule then collapsed to the floor and failed correct kernels (measured: ``dv``
4.8e-7 against a bound of 2.4e-7). Measured with ``scripts/measure_tails.py --degenerate`` (3000 draws
weighted towards short segments and small windows, torch 2.13 CPU sdpa), the smallest k that passes:

    yardstick                  float32 out / dq / dk / dv     bfloat16 out / dq / dk / dv
    autograd only              1.7 / 8.9 / 10.6 / 7.6 (*)     -   / 8.9 / 7.2 / 0.3
    larger of both             1.8 / 4.1 / 3.5 / 2.9          -   / 1.0 / 1.3 / 1.5

    (*) plus draws where the autograd yardstick is exactly 0 and the error 2-11 ulps.

k = 2 for outputs and 3 for gradients, as in flash-attention's own tests, except float32. There the
yardstick shares the kernel's precision while the fused SDPA kernels compute another way; the larger of
both yardsticks needs k = 1.8 (out) and 4.1 (grads) over the draws above, so float32 keeps k_out = 4 and
k_grad = 6, set from measurements, not to pass a given draw. On CUDA, float32 SDPA with a mask runs the
memory-efficient kernel, whose blocked fp32 backward strays further: over 300 random draws on an H200 (with
the autograd yardstick alone) the smallest k that would pass was 2.8 (out), 6.0 (dq), 8.0 (dk), 4.4 (dv),
and one explicit corner case (eight segments of 1-3 tokens, window (1, 0)) needed 10.8 for dq; hence
k_grad = 16 there (absolute errors ~2e-6). The half dtypes keep flash-attention's values and need them: on
the H200 no draw of the sdpa or torch backends came above k = 1.0.

A compiled case (``qwenvl verify --compile``) has a second yardstick: the unpatched model with the same regions
compiled, each sample alone (``qwenvl.verify.parity._compiled_unpatched``). Inductor rounds a region's fused
elementwise work once where eager rounds after every op, so a compiled run's error is another draw than the
eager yardstick's; judged on one scalar (the fused loss), two independent draws differ by more than k = 2 about
three times in ten.

``zero_atol`` applies only when the reference and the plain computation are both identically zero (every
query sees one key: dq and dk are exactly 0, the rule's bound is 0, a fused kernel leaves ~1e-7 of
rounding). ``model_atol`` is an absolute cap on whole-model parity where the specification fixes one.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["Tolerance", "TOLERANCES", "tolerance", "reference_dtype", "rounding_floor", "Verdict", "judge"]


class Tolerance(NamedTuple):
    k_out: float
    k_grad: float
    zero_atol: float
    model_atol: float | None


TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    ("cpu", torch.float32): Tolerance(k_out=4, k_grad=6, zero_atol=1e-5, model_atol=1e-4),
    ("cpu", torch.bfloat16): Tolerance(k_out=2, k_grad=3, zero_atol=1e-5, model_atol=None),
    ("cuda", torch.float32): Tolerance(k_out=4, k_grad=16, zero_atol=1e-5, model_atol=1e-4),
    ("cuda", torch.bfloat16): Tolerance(k_out=2, k_grad=3, zero_atol=1e-5, model_atol=None),
    ("cuda", torch.float16): Tolerance(k_out=2, k_grad=3, zero_atol=1e-5, model_atol=None),
}


def tolerance(device, dtype: torch.dtype) -> Tolerance:
    key = (torch.device(device).type, dtype)
    if key not in TOLERANCES:
        have = ", ".join(f"{d}/{str(t).removeprefix('torch.')}" for d, t in TOLERANCES)
        raise KeyError(f"no tolerance for device {key[0]} and dtype {dtype}; measured combinations: {have}")
    return TOLERANCES[key]


def reference_dtype(device, dtype: torch.dtype) -> torch.dtype:
    """float64 on CPU and for float32 tests (an fp32 oracle would not be above the thing tested); else fp32."""
    if torch.device(device).type == "cpu" or dtype in (torch.float32, torch.float64):
        return torch.float64
    return torch.float32


def rounding_floor(out_ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the rounding of one add in ``dtype`` at ``out_ref``'s magnitude (flash-attention's floor)."""
    ref64 = out_ref.detach().double()
    rounded = (out_ref.detach().to(dtype) + 0.3) - 0.3
    return 2 * (rounded.double() - ref64).abs().max().item()


class Verdict(NamedTuple):
    """One application of the rule: ``passed`` iff ``err <= bound`` (NaN fails)."""

    err: float
    yardstick_err: float
    floor: float
    bound: float
    how: str
    passed: bool


def _max_abs_diff(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return (a.detach().double() - ref64).abs().max().item() if ref64.numel() else 0.0


def judge(
    out: torch.Tensor,
    out_ref: torch.Tensor,
    yardsticks: torch.Tensor | Sequence[torch.Tensor],
    *,
    k: float,
    zero_atol: float | None = None,
) -> Verdict:
    """The rule, the one place it is computed: ``max|out - out_ref| <= k * max|out_pt - out_ref| + floor``.

    ``yardsticks``: one or more plain computations in the test dtype (which sets the floor's dtype); the
    largest error counts. ``zero_atol`` replaces the bound only when ``out_ref`` and every yardstick are
    identically zero.
    """
    if isinstance(yardsticks, torch.Tensor):
        yardsticks = (yardsticks,)
    if not yardsticks:
        raise ValueError("judge needs at least one yardstick (a plain computation in the test dtype)")
    for t in (out, *yardsticks):
        if t.shape != out_ref.shape:
            raise ValueError(f"shapes differ: {tuple(t.shape)} against the reference's {tuple(out_ref.shape)}")
    ref64 = out_ref.detach().double()
    dtype = yardsticks[0].dtype
    err = _max_abs_diff(out, ref64)
    yard = max(_max_abs_diff(t, ref64) for t in yardsticks)
    floor = rounding_floor(out_ref, dtype) if ref64.numel() else 0.0
    bound = k * yard + floor
    how = f"{k} * max|out_pt - out_ref| ({yard:.3e}) + floor ({floor:.3e}) [{dtype}]"
    if zero_atol is not None and not ref64.any() and not any(t.detach().any() for t in yardsticks):
        bound, how = zero_atol, "zero_atol (out_ref and out_pt identically zero)"
    return Verdict(err=err, yardstick_err=yard, floor=floor, bound=bound, how=how, passed=err <= bound)
