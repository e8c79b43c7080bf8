"""``qwenvl`` command line. ``qwenvl verify`` proves the patches on the installed transformers release;
``qwenvl train`` fine-tunes on packed batches (``qwenvl.train.run``).

Every option of ``qwenvl verify`` is checked before the first case runs (``qwenvl.verify.plan``): a bad value is one
line naming it and the valid choices, exit status 2. The options ``qwenvl.patch`` takes have its names here too
(``--backend``, ``--linear_backend``, ``--compile``, ``--fused_cross_entropy``: ``qwenvl.options``), each option is
spelled with ``_`` or ``-``, and an old name (``--convention``) still works with a note. What the default run leaves
out on this machine (a backend that cannot run on a device, a device that is absent) and what this release cannot
run is printed with the reason before the cases start. This module defines the options, runs the planned cases
(``qwenvl.verify.parity.run_case``) and the golden section, and writes the report; what the report says and how it
is drawn is ``qwenvl.verify.report``'s.

After the cases, the golden section checks each family against the tensors recorded under the pinned release
(``qwenvl.verify.golden``: "transformers changed" is told apart from "our patch differs"); the report (JSON, and
Markdown with ``--markdown``) holds the cases, the backend/device coverage and the golden drift, and the last line
says what to do (``qwenvl.verify.report.last_line``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import fields

from qwenvl.options import CHOICES, PatchOptions, current_names, option_help
from qwenvl.verify.plan import CONVENTIONS, DEVICES, DTYPE_ALIASES, Plan, case_dtypes, supported_combos
from qwenvl.verify.plan import make_plan as _plan
from qwenvl.verify.plan import specs_for as _specs_for

__all__ = ["main"]

DESCRIPTION = (
    "qwenvl: packed-sequence (varlen) training for Qwen-VL models. "
    "'qwenvl verify' proves the patched models equal the unpatched ones on the installed transformers release."
)


def verify(parser: argparse.ArgumentParser, args) -> int:
    plan = _plan(parser, args)

    import torch
    import transformers

    from qwenvl.patches._versions import UnsupportedTransformersVersion, check_transformers_version
    from qwenvl.verify.report import cases_table

    try:
        # This run is the check the warning would ask for: say it once here, not in every case's patch.
        check_transformers_version(warn=False)
    except UnsupportedTransformersVersion as exc:
        print(f"qwenvl verify: error: {exc}", file=sys.stderr)
        return 2
    _print_header(plan)
    rows = []
    for i, case in enumerate(plan.cases, 1):
        row = _run_one(args, case, f"[{i}/{len(plan.cases)}]")
        (plan.skipped if "limit" in row else rows).append(row)  # a limit found at run time joins the plan's
    print()
    print(cases_table(rows))
    golden = None if args.no_golden else _golden_section(plan.families)
    report = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "skipped": plan.skipped,
        "cases": rows,
        "passed": all(r["passed"] for r in rows) and not (golden is not None and golden.failed),
    }
    return _finish(args, plan, report, golden)


def _print_header(plan: Plan) -> None:
    """The versions and the number of cases, and what the plan left out, said before the first case runs."""
    import torch
    import transformers

    from qwenvl.patches._versions import TESTED_VERSIONS, newer_than_tested
    from qwenvl.verify.report import skipped_line

    print(f"qwenvl verify: transformers {transformers.__version__}, torch {torch.__version__}, {len(plan.cases)} cases")
    if newer_than_tested():
        print(
            f"transformers {transformers.__version__} is newer than the newest tested release ({TESTED_VERSIONS[-1]}): "
            "this run is what proves the patches on it"
        )
    if plan.skipped:
        print(skipped_line(plan.skipped))


def _run_one(args, case: tuple[str, str, str, str, str], counter: str) -> dict:
    """One case through ``run_case`` (a crash is a failed case, reported, not a traceback that hides the table):
    its report row, non-finite numbers as ``None``, after printing its progress line."""
    import transformers

    from qwenvl.verify.parity import DEFAULT_SPECS, run_case
    from qwenvl.verify.report import case_detail, finite

    from qwenvl.release_bugs import UpstreamLimit

    family, backend, device, dtype_name, convention = case
    start = time.perf_counter()
    try:
        options = _patch_options(args)
        specs = _specs_for(family, transformers.__version__)
        limited = {} if specs == DEFAULT_SPECS else {"specs": specs}  # named in the plan's skipped entries
        row = run_case(
            family, backend=backend, device=device, convention=convention, **case_dtypes(dtype_name), **options,
            **limited,
        ).as_dict()
        row.update(options)
    except UpstreamLimit as exc:  # the unpatched model cannot run this case at all (found only by running it)
        print(f"{counter} {family} {backend} {device} {dtype_name} {convention}: LIMIT ({exc})", flush=True)
        return {"family": family, "device": device, "limit": f"{dtype_name} cannot run on {device}", "reason": str(exc)}
    except Exception as exc:
        row = {
            "family": family, "backend": backend, "device": device, "dtype": dtype_name,
            "convention": convention, "logits_err": None, "logits_bound": None,
            "grad_err": None, "grad_bound": None, "passed": False,
            "error": f"{type(exc).__name__}: {exc}",
        }
    row = finite(row)
    status = "PASS" if row["passed"] else "FAIL"
    print(
        f"{counter} {family} {backend} {device} {row['dtype']} {convention}: {status} ({case_detail(row)}) "
        f"{time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return row


def _patch_options(args) -> dict:
    """The patch options given besides ``--backend`` (a case's own): ``run_case``'s keywords and report fields."""
    given = {f.name: (getattr(args, f.name), f.default) for f in fields(PatchOptions) if f.name != "backend"}
    return {name: value for name, (value, default) in given.items() if value != default}


def _golden_section(families: list[str]):
    """Each family against the golden tensors (CPU, float32), a line per family, then the table."""
    from qwenvl.verify.golden import check_golden
    from qwenvl.verify.report import golden_table

    def line(result):
        numbers = ""
        if result.unpatched is not None:
            drift = "-" if result.ref_drift is None else f"{result.ref_drift:.1e}"
            numbers = (
                f"unpatched {result.unpatched.ratio:.2f}x, patched {result.patched.ratio:.2f}x of the bound, "
                f"fp64 drift {drift}; "
            )
        print(f"[golden] {result.family}: {result.status} ({numbers}{result.seconds:.1f}s){': ' + result.reason if result.reason else ''}", flush=True)

    print("\ngolden: each family against the tensors recorded under the pinned release (cpu, float32)")
    golden = check_golden(families, progress=line)
    print()
    print(golden_table(golden.as_dict()))
    return golden


def _finish(args, plan: Plan, report: dict, golden) -> int:
    """Write the JSON (and Markdown) report, print the totals and the last line; the exit status."""
    from qwenvl.verify.golden import known_drift
    from qwenvl.verify.report import coverage, finite, last_line, skipped_line, to_markdown

    rows = report["cases"]
    report["coverage"] = coverage(rows, plan.skipped)
    report["golden"] = None if golden is None else finite(golden.as_dict())
    report["summary"] = last_line(report)
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=2, allow_nan=False)
    written = args.json
    if args.markdown is not None:
        with open(args.markdown, "w") as fh:
            fh.write(to_markdown(report))
        written += f" and {args.markdown}"
    failed = sum(not r["passed"] for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed; report written to {written}")
    if plan.skipped:
        print(skipped_line(plan.skipped))
    print(report["summary"])
    golden_failed = golden is not None and golden.failed
    unexplained = golden is not None and any(
        f.status in ("transformers changed", "transformers changed; our patch differs") and not known_drift(f.family)
        for f in golden.families
    )
    return 1 if failed or not rows or golden_failed or (args.fail_on_drift and unexplained) else 0


def _version_line() -> str:
    """qwenvl's version and the installed transformers and torch, read from their metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from qwenvl import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"qwenvl {__version__} (transformers {installed('transformers')}, torch {installed('torch')})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenvl", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="{verify,train}")
    sub.add_parser(
        "train",
        help="fine-tune on packed batches: qwenvl train --output_dir out (every TrainingArguments flag; "
        "qwenvl train --help)",
        add_help=False,
    )
    p = sub.add_parser(
        "verify",
        help="prove the patched models equal the unpatched ones on this transformers release",
        description=(
            "Run each case (family x backend x device x dtype x convention) on a tiny random model, print a "
            "table, write a JSON report; exit 1 if any case fails, 2 on a bad option."
        ),
    )
    _add_case_options(p)
    _add_run_options(p)
    p.set_defaults(parser=p)
    return parser


def _add_case_options(p: argparse.ArgumentParser) -> None:
    """``qwenvl verify``'s options that choose the cases: family x backend x device x dtype x convention."""
    from qwenvl.families import FAMILIES

    combos = supported_combos()
    dtype_names = list(dict.fromkeys(name for names in combos.values() for name in names))
    aliases = [alias for alias, name in DTYPE_ALIASES.items() if name in dtype_names]
    p.add_argument(
        "--family", action="append", choices=list(FAMILIES), metavar="FAMILY",
        help=f"model family, repeatable; one of: {', '.join(FAMILIES)} (default: all)",
    )
    p.add_argument(
        "--backend", action="append", choices=CHOICES["backend"].values, metavar="BACKEND",
        help=(
            f"{option_help('backend')} Repeatable (default: every backend available on each device; the run says "
            "which it skipped and why)."
        ),
    )
    p.add_argument(
        "--device", action="append", choices=DEVICES, metavar="DEVICE",
        help=f"repeatable; one of: {', '.join(DEVICES)} (default: cpu, and cuda if present)",
    )
    p.add_argument(
        "--dtype", action="append", choices=[*dtype_names, *aliases], metavar="DTYPE",
        help=(
            f"repeatable; one of: {', '.join(dtype_names)} (or {', '.join(aliases)}); each device must have a "
            "tolerance for it: "
            + "; ".join(f"{d}: {', '.join(names)}" for d, names in combos.items())
            + " (default: float32 on cpu, bfloat16 on cuda); autocast-<half>: the model in float32 under "
            "torch.autocast to that dtype, what --bf16 / --fp16 do to a float32 model"
        ),
    )
    p.add_argument(
        *_spellings("packing_convention"), action="append", choices=CONVENTIONS, metavar="CONVENTION",
        help=f"packing convention, repeatable; one of: {', '.join(CONVENTIONS)} (default: all)",
    )


def _spellings(name: str) -> list[str]:
    """``--name``, and ``--na-me`` where the name has an underscore (``HfArgumentParser`` does so for ``qwenvl train``)."""
    return [f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else [])]


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``qwenvl verify``'s options for how the cases run (the packed side's patch options) and what the run reports."""
    p.add_argument("--compile", action="store_true", help=f"{option_help('compile')} Slow to start.")
    p.add_argument(
        *_spellings("linear_backend"), default="auto", choices=CHOICES["linear_backend"].values, metavar="NAME",
        help=f"{option_help('linear_backend')} Default: auto.",
    )
    p.add_argument(
        *_spellings("fused_cross_entropy"), action="store_true",
        help=f"{option_help('fused_cross_entropy')} The packed side then trains on labels (the oracle takes the same "
        "loss) and the loss is judged in place of the logits.",
    )
    p.add_argument(
        "--json", default="qwenvl-verify.json", metavar="PATH",
        help="where to write the JSON report (default: %(default)s); its directory must exist and be writable",
    )
    p.add_argument(
        "--markdown", metavar="PATH",
        help="also write the report as Markdown (summary, backend/device coverage, golden drift, cases)",
    )
    p.add_argument(
        *_spellings("no_golden"), action="store_true",
        help="skip the golden section (each family against the tensors recorded under the pinned release)",
    )
    p.add_argument(
        *_spellings("fail_on_drift"), action="store_true",
        help="exit 1 when transformers changed a family's outputs in a way not yet explained (a release watch); "
        "by default drift is reported and only our patch differing fails",
    )

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # HfArgumentParser owns every flag of `qwenvl train` (all of transformers' TrainingArguments).
        from qwenvl.train.run import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["verify"]:
        argv = ["verify", *current_names("verify", argv[1:])]
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args.parser, args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
