"""``qwenvl`` command line. ``qwenvl verify`` proves the patches on the installed transformers release."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

__all__ = ["main"]

CONVENTIONS = ("upstream", "hf_positions", "hf_kwargs")


def _cases(args):
    import torch

    from qwenvl.attention import available_backends
    from qwenvl.fixtures import FAMILY_NAMES

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        dtypes = [torch.bfloat16] if torch.device(device).type == "cuda" else [torch.float32]
        if args.dtype:
            dtypes = [getattr(torch, name) for name in args.dtype]
        backends = args.backend or available_backends(device)
        for family in args.family or FAMILY_NAMES:
            for backend in backends:
                for dtype in dtypes:
                    for convention in args.convention or CONVENTIONS:
                        yield family, backend, device, dtype, convention


def _format_table(rows) -> str:
    header = ("family", "backend", "device", "dtype", "convention", "logits err", "bound", "grad err", "bound", "pass")
    body = [
        (
            r["family"],
            r["backend"],
            r["device"],
            r["dtype"],
            r["convention"],
            f"{r['logits_err']:.2e}",
            f"{r['logits_bound']:.2e}",
            f"{r['grad_err']:.2e}",
            f"{r['grad_bound']:.2e}",
            "PASS" if r["passed"] else "FAIL",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verify(args) -> int:
    import torch
    import transformers

    from qwenvl.patches._versions import check_transformers_version
    from qwenvl.verify.parity import run_case

    check_transformers_version()
    cases = list(_cases(args))
    print(f"qwenvl verify: transformers {transformers.__version__}, torch {torch.__version__}, {len(cases)} cases")
    rows = []
    for i, (family, backend, device, dtype, convention) in enumerate(cases, 1):
        start = time.perf_counter()
        try:
            row = run_case(family, backend=backend, device=device, dtype=dtype, convention=convention).as_dict()
        except Exception as exc:  # a crash is a failed case, reported, not a traceback that hides the table
            row = {
                "family": family, "backend": backend, "device": device, "dtype": str(dtype).removeprefix("torch."),
                "convention": convention, "logits_err": float("nan"), "logits_bound": float("nan"),
                "grad_err": float("nan"), "grad_bound": float("nan"), "passed": False,
                "error": f"{type(exc).__name__}: {exc}",
            }
        rows.append(row)
        status = "PASS" if row["passed"] else "FAIL"
        detail = row.get("error") or f"logits {row['logits_err']:.1e}, grads {row['grad_err']:.1e}"
        print(
            f"[{i}/{len(cases)}] {family} {backend} {device} {row['dtype']} {convention}: {status} ({detail}) "
            f"{time.perf_counter() - start:.1f}s",
            flush=True,
        )
    print()
    print(_format_table(rows))
    report = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cases": rows,
        "passed": all(r["passed"] for r in rows),
    }
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=2)
    failed = sum(not r["passed"] for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed; report written to {args.json}")
    return 1 if failed or not rows else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwenvl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="prove the patched models equal the unpatched ones on this transformers release")
    p.add_argument("--family", action="append", help="family to check (repeatable; default: all four)")
    p.add_argument("--backend", action="append", help="varlen backend (repeatable; default: all available here)")
    p.add_argument("--device", action="append", help="cpu / cuda (repeatable; default: cpu, and cuda if present)")
    p.add_argument("--dtype", action="append", help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--convention", action="append", choices=CONVENTIONS, help="packing convention (default: all)")
    p.add_argument("--json", default="qwenvl-verify.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
