"""Measure how far a backend's error strays from the tolerance rule's yardstick, to calibrate k per dtype.

For random attention draws it prints, per quantity (out, dq, dk, dv), the largest ratio
``(max|out - out_ref| - floor) / max|out_pt - out_ref|``: the smallest k the rule would need.
Usage: python scripts/measure_tails.py --backend sdpa --dtype float32 --device cuda --draws 300
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
from qwenvl.reference import attention_ref, mask_from_cu_seqlens  # noqa: E402
from qwenvl.tolerances import reference_dtype, rounding_floor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--draws", type=int, default=300)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    worst = {name: (0.0, None) for name in ("out", "dq", "dk", "dv")}

    @settings(max_examples=args.draws, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=attention_cases())
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
        for name, got, ref, plain in zip(worst, *results):
            ref64 = ref.detach().double()
            err = (got.detach().double() - ref64).abs().max().item() if ref64.numel() else 0.0
            pt_err = (plain.detach().double() - ref64).abs().max().item() if ref64.numel() else 0.0
            if pt_err > 0:
                ratio = (err - rounding_floor(ref, dtype)) / pt_err
                if ratio > worst[name][0]:
                    worst[name] = (ratio, case)

    run()
    print(f"{args.backend} {args.dtype} on {args.device}, {args.draws} draws: smallest k the rule would need")
    for name, (ratio, case) in worst.items():
        print(f"  {name}: {ratio:.2f}  ({case})")


if __name__ == "__main__":
    main()
