"""``qwenvl`` command line. ``qwenvl verify`` proves the patches on the installed transformers release;
``qwenvl train`` fine-tunes on packed batches (``qwenvl.train.run``).

Every option of ``qwenvl verify`` is checked before the first case runs: a bad value is one line naming it
and the valid choices, exit status 2. What the default run leaves out on this machine (a backend that
cannot run on a device, a device that is absent) is printed with the reason before the cases start.

After the cases, the golden section checks each family against the tensors recorded under the pinned release
(``qwenvl.verify.golden``: "transformers changed" is told apart from "our patch differs"); the report (JSON, and
Markdown with ``--markdown``) holds the cases, the backend/device coverage and the golden drift, and the last line
says what to do (``qwenvl.verify.report.last_line``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

__all__ = ["main"]

CONVENTIONS = ("upstream", "hf_positions", "hf_kwargs")
DEVICES = ("cpu", "cuda")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}

DESCRIPTION = (
    "qwenvl: packed-sequence (varlen) training for Qwen-VL models. "
    "'qwenvl verify' proves the patched models equal the unpatched ones on the installed transformers release."
)


@dataclass
class Plan:
    """The validated run: the cases, in order, and what the defaults left out on this machine, with why."""

    cases: list[tuple[str, str, str, str, str]]  # (family, backend, device, dtype name, convention)
    skipped: list[dict] = field(default_factory=list)  # {"backend"?, "device", "reason"}
    families: list[str] = field(default_factory=list)  # asked for (or all), this release's and the others


def _supported_combos() -> dict[str, list[str]]:
    from qwenvl.tolerances import TOLERANCES

    combos: dict[str, list[str]] = {}
    for device, dtype in TOLERANCES:
        combos.setdefault(device, []).append(str(dtype).removeprefix("torch."))
    return combos


def _no_cuda_reason() -> str:
    import torch

    return f"torch {torch.__version__} sees no CUDA device"


def _plan(parser: argparse.ArgumentParser, args) -> Plan:
    """Check every option against this machine and turn them into the list of cases; ``parser.error`` on the
    first bad one."""
    import torch

    from qwenvl.attention import available_backends, unavailable_reason
    from qwenvl.families import FAMILIES

    _check_json_path(parser, args.json)
    if args.markdown is not None:
        _check_json_path(parser, args.markdown, option="--markdown")
    skipped = []

    if args.device:
        devices = list(dict.fromkeys(args.device))
        if "cuda" in devices and not torch.cuda.is_available():
            parser.error(f"argument --device: cuda was asked for but {_no_cuda_reason()}; choose from: cpu")
    else:
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices.append("cuda")
        else:
            skipped.append({"device": "cuda", "reason": _no_cuda_reason()})

    # With the default devices, an option that only one of them refuses is fixed by naming the devices.
    hint = "; pass --device to choose the devices" if not args.device and len(devices) > 1 else ""
    combos = _supported_combos()
    dtypes = {device: [DEFAULT_DTYPES[device]] for device in devices}
    if args.dtype:
        asked = list(dict.fromkeys(DTYPE_ALIASES.get(name, name) for name in args.dtype))
        for device in devices:
            for dtype in asked:
                if dtype not in combos.get(device, []):
                    supported = "; ".join(f"{d}: {', '.join(names)}" for d, names in combos.items())
                    parser.error(
                        f"argument --dtype: {dtype} on {device} has no tolerance entry (qwenvl.tolerances); "
                        f"supported: {supported}{hint}"
                    )
            dtypes[device] = asked

    backends = {}
    for device in devices:
        if args.backend:
            backends[device] = list(dict.fromkeys(args.backend))
            for name in backends[device]:
                why = None if name == "auto" else unavailable_reason(name, device)
                if why is not None:
                    parser.error(
                        f"argument --backend: {name} is not available on {device} ({why}); "
                        f"available on {device}: {', '.join(['auto', *available_backends(device)])}{hint}"
                    )
        else:
            backends[device] = available_backends(device)
            for name in _all_backends():
                why = unavailable_reason(name, device)
                if why is not None:
                    skipped.append({"backend": name, "device": device, "reason": why})

    import transformers

    version = transformers.__version__
    families = list(dict.fromkeys(args.family or FAMILIES))
    asked = list(families)
    for family in families:
        spec = FAMILIES[family]
        if spec.available(version):
            continue
        why = f"transformers {version} has no {family} (from {spec.min_transformers})"
        if args.family:
            parser.error(f"argument --family: {why}; available here: {', '.join(f for f in FAMILIES if FAMILIES[f].available(version))}")
        skipped.append({"family": family, "reason": why})
    families = [f for f in families if FAMILIES[f].available(version)]
    conventions = list(dict.fromkeys(args.convention or CONVENTIONS))
    cases = [
        (family, backend, device, dtype, convention)
        for device in devices
        for family in families
        for backend in backends[device]
        for dtype in dtypes[device]
        for convention in conventions
    ]
    # A family whose model cannot run in float64 on this release (release_run, from FamilySpec.release_bugs) has no
    # oracle on the CPU: its cases there are left out, naming the transformers bug (the golden check still judges
    # its patch).
    from qwenvl.tolerances import reference_dtype
    from qwenvl.verify.batches import release_run

    no_oracle = {}
    for family, _, device, dtype, _ in cases:
        float64 = reference_dtype(device, getattr(torch, dtype)) == torch.float64
        why = release_run(family, float64=float64, version=version).left_out.get("float64")
        if why:
            no_oracle.setdefault((family, device, dtype), why)
    cases = [case for case in cases if (case[0], case[2], case[3]) not in no_oracle]
    skipped += [
        {"family": family, "device": device, "limit": f"no float64 oracle for {dtype} on {device}", "reason": why}
        for (family, device, dtype), why in no_oracle.items()
    ]
    # A release that cannot run a family's videos at all (Qwen3-Omni on 5.0.0) runs its cases without the video.
    from qwenvl.verify.parity import DEFAULT_SPECS

    for family in families:
        why = release_run(family, DEFAULT_SPECS, version=version).left_out.get("videos")
        if why and any(case[0] == family for case in cases):
            skipped.append({"family": family, "limit": "videos left out", "reason": why})
    return Plan(cases=cases, skipped=skipped, families=asked)


def _specs_for(family: str, version: str):
    """``DEFAULT_SPECS``, less what the release cannot run of them (``release_run``; named in the plan)."""
    from qwenvl.verify.batches import release_run
    from qwenvl.verify.parity import DEFAULT_SPECS

    return release_run(family, DEFAULT_SPECS, version=version).specs


def _all_backends() -> list[str]:
    from qwenvl.attention import BACKENDS

    return list(BACKENDS)


def _check_json_path(parser: argparse.ArgumentParser, path: str, option: str = "--json") -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"argument {option}: {path} is a directory; give a file path")
    if not os.path.isdir(directory):
        parser.error(f"argument {option}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error(f"argument {option}: cannot write {path} (permission denied)")


def _skip_line(skipped: list[dict]) -> str:
    parts = []
    for entry in skipped:
        if "limit" in entry:
            parts.append(f"{entry['family']}: {entry['limit']} ({entry['reason']})")
        elif "family" in entry:
            parts.append(f"family {entry['family']} ({entry['reason']})")
        elif "backend" in entry:
            parts.append(f"{entry['backend']} on {entry['device']} ({entry['reason']})")
        else:
            parts.append(f"device {entry['device']} ({entry['reason']})")
    return "skipped: " + ", ".join(parts)


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def _format_table(rows) -> str:
    header = ("family", "backend", "device", "dtype", "convention", "logits err", "bound", "grad err", "bound", "pass")
    body = [
        (
            r["family"],
            r["backend"],
            r["device"],
            r["dtype"],
            r["convention"],
            _fmt(r["logits_err"]),
            _fmt(r["logits_bound"]),
            _fmt(r["grad_err"]),
            _fmt(r["grad_bound"]),
            "PASS" if r["passed"] else "FAIL",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verify(parser: argparse.ArgumentParser, args) -> int:
    plan = _plan(parser, args)

    import torch
    import transformers

    from qwenvl.patches._versions import (
        TESTED_VERSIONS,
        UnsupportedTransformersVersion,
        check_transformers_version,
        newer_than_tested,
    )
    from qwenvl.verify.parity import DEFAULT_SPECS, run_case

    try:
        # This run is the check the warning would ask for: say it once here, not in every case's patch.
        check_transformers_version(warn=False)
    except UnsupportedTransformersVersion as exc:
        print(f"qwenvl verify: error: {exc}", file=sys.stderr)
        return 2
    cases = plan.cases
    print(f"qwenvl verify: transformers {transformers.__version__}, torch {torch.__version__}, {len(cases)} cases")
    if newer_than_tested():
        print(
            f"transformers {transformers.__version__} is newer than the newest tested release ({TESTED_VERSIONS[-1]}): "
            "this run is what proves the patches on it"
        )
    if plan.skipped:
        print(_skip_line(plan.skipped))
    rows = []
    for i, (family, backend, device, dtype_name, convention) in enumerate(cases, 1):
        start = time.perf_counter()
        dtype = getattr(torch, dtype_name)
        try:
            options = {"compile": True} if args.compile else {}
            if args.linear_backend != "auto":
                options["linear_backend"] = args.linear_backend
            specs = _specs_for(family, transformers.__version__)
            limited = {} if specs == DEFAULT_SPECS else {"specs": specs}  # named in the plan's skipped entries
            row = run_case(
                family, backend=backend, device=device, dtype=dtype, convention=convention, **options, **limited
            ).as_dict()
            row.update(options)
        except Exception as exc:  # a crash is a failed case, reported, not a traceback that hides the table
            row = {
                "family": family, "backend": backend, "device": device, "dtype": dtype_name,
                "convention": convention, "logits_err": None, "logits_bound": None,
                "grad_err": None, "grad_bound": None, "passed": False,
                "error": f"{type(exc).__name__}: {exc}",
            }
        row = {key: _finite_or_none(value) for key, value in row.items()}
        rows.append(row)
        status = "PASS" if row["passed"] else "FAIL"
        detail = row.get("error") or f"logits {_fmt(row['logits_err'])}, grads {_fmt(row['grad_err'])}"
        print(
            f"[{i}/{len(cases)}] {family} {backend} {device} {row['dtype']} {convention}: {status} ({detail}) "
            f"{time.perf_counter() - start:.1f}s",
            flush=True,
        )
    print()
    print(_format_table(rows))
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
    from qwenvl.verify.report import coverage, finite, last_line, to_markdown

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
        print(_skip_line(plan.skipped))
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
    from qwenvl.families import FAMILIES
    from qwenvl.patches._linear import LINEAR_BACKENDS

    combos = _supported_combos()
    dtype_names = list(dict.fromkeys(name for names in combos.values() for name in names))
    aliases = [alias for alias, name in DTYPE_ALIASES.items() if name in dtype_names]
    backends = ["auto", *_all_backends()]

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
    p.add_argument(
        "--family", action="append", choices=list(FAMILIES), metavar="FAMILY",
        help=f"model family, repeatable; one of: {', '.join(FAMILIES)} (default: all)",
    )
    p.add_argument(
        "--backend", action="append", choices=backends, metavar="BACKEND",
        help=(
            f"varlen attention backend, repeatable; one of: {', '.join(backends)} (default: every backend "
            "available on each device; the run says which it skipped and why)"
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
            + " (default: float32 on cpu, bfloat16 on cuda)"
        ),
    )
    p.add_argument(
        "--convention", action="append", choices=CONVENTIONS, metavar="CONVENTION",
        help=f"packing convention, repeatable; one of: {', '.join(CONVENTIONS)} (default: all)",
    )
    p.add_argument(
        "--compile", action="store_true",
        help="run the packed side with regional compilation (qwenvl.patch(model, compile=True)); slow to start",
    )
    p.add_argument(
        "--linear-backend", default="auto", choices=["auto", *LINEAR_BACKENDS], metavar="NAME",
        help=f"Gated DeltaNet layers of hybrid families; one of: auto, {', '.join(LINEAR_BACKENDS)} (default: auto)",
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
        "--no-golden", action="store_true",
        help="skip the golden section (each family against the tensors recorded under the pinned release)",
    )
    p.add_argument(
        "--fail-on-drift", action="store_true",
        help="exit 1 when transformers changed a family's outputs in a way not yet explained (a release watch); "
        "by default drift is reported and only our patch differing fails",
    )
    p.set_defaults(parser=p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # HfArgumentParser owns every flag of `qwenvl train` (all of transformers' TrainingArguments).
        from qwenvl.train.run import main as train_main

        return train_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args.parser, args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
