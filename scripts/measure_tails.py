"""Measure how far a backend's error strays from the tolerance rule's yardstick, to calibrate k per dtype.

For random attention draws it prints, per quantity (out, dq, dk, dv), the largest ratio
``(max|out - out_ref| - floor) / max|out_pt - out_ref|``: the smallest k the rule would need, once with
autograd's plain backward as the only yardstick and once with the larger of it and FlashAttention's plain
backward (``qwenvl.reference.attention_ref_flash_grads``), which is what the tests use. ``--degenerate``
draws short segments and windows of at most one token each side, where the two yardsticks part.
Usage: python scripts/measure_tails.py --backend sdpa --dtype float32 --device cuda --draws 300 [--degenerate]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity_tests"))

from strategies import attention_cases  # noqa: E402

from qwenvl.attention import varlen_attention  # noqa: E402
from qwenvl.packing import VarlenMeta  # noqa: E402
from qwenvl.reference import attention_ref, attention_ref_flash_grads, mask_from_cu_seqlens  # noqa: E402
from qwenvl.tolerances import judge, reference_dtype  # noqa: E402

NAMES = ("out", "dq", "dk", "dv")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--degenerate", action="store_true", help="short segments, windows of at most one token a side")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    worst = {(yard, name): (0.0, None) for yard in ("autograd", "both") for name in NAMES}
    cases = attention_cases(max_length=12, max_window=1) if args.degenerate else attention_cases()

    @settings(max_examples=args.draws, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case):
        q, k, v, grad_out = case.tensors(dtype, device)
        meta = VarlenMeta.from_lengths(case.lengths, device=device)
        mask = mask_from_cu_seqlens(meta.cu_seqlens, causal=case.causal, window=case.window)
        out = varlen_attention(q, k, v, meta, backend=args.backend, causal=case.causal, window=case.window, scale=case.scale)
        results = [(out, *torch.autograd.grad(out, (q, k, v), grad_out))]
        for upcast, in_dtype in ((True, reference_dtype(device, dtype)), (False, dtype)):
            leaves = [t.detach().to(in_dtype).requires_grad_() for t in (q, k, v)]
            ref = attention_ref(*leaves, mask, scale=case.scale, upcast=upcast)
            results.append((ref, *torch.autograd.grad(ref, leaves, grad_out.to(in_dtype))))
        plain_out = results[2][0].detach()
        flash = (plain_out, *attention_ref_flash_grads(q, k, v, mask, plain_out, grad_out, scale=case.scale))
        for name, got, ref, plain, plain_flash in zip(NAMES, *results, flash):
            if not ref.detach().any():
                continue  # an exactly-zero reference is judged by zero_atol, not by the ratio
            for yard, sticks in (("autograd", plain), ("both", (plain, plain_flash))):
                verdict = judge(got, ref, sticks, k=1.0)
                if verdict.err <= verdict.floor:
                    continue
                ratio = (verdict.err - verdict.floor) / verdict.yardstick_err if verdict.yardstick_err else float("inf")
                if ratio > worst[yard, name][0]:
                    worst[yard, name] = (ratio, case)

    run()
    kind = "degenerate" if args.degenerate else "random"
    print(f"{args.backend} {args.dtype} on {args.device}, {args.draws} {kind} draws: smallest k the rule would need")
    for (yard, name), (ratio, case) in worst.items():
        print(f"  {yard:8s} {name}: {ratio:.2f}  ({case})")


if __name__ == "__main__":
    main()
