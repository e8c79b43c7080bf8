"""What ``qwenvl verify`` runs: every option checked against this machine before the first case (``parser.error``,
one line naming the option and the valid choices, on the first bad one), then the cases, in order, less what this
release cannot run, and what was left out with why (``make_plan``).

Option checks (``_devices``, ``_dtypes``, ``_backends``, ``_families``, ``_check_json_path``) each validate one option
and give its values; with an option left at its default, what this machine cannot run (an absent device, a backend
that cannot run on a device, a family this release lacks) is left out and named instead. What runs on this
release is decided by ``qwenvl.verify.batches.release_run`` (``_release_limits``), as for ``run_case`` and the
golden check.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from qwenvl.packing import CONVENTIONS

__all__ = [
    "CONVENTIONS",
    "DEVICES",
    "DTYPE_ALIASES",
    "DEFAULT_DTYPES",
    "Plan",
    "make_plan",
    "specs_for",
    "supported_combos",
    "case_dtypes",
    "all_backends",
]

DEVICES = ("cpu", "cuda")
DTYPE_ALIASES = {
    "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "autocast-bf16": "autocast-bfloat16",
    "autocast-fp16": "autocast-float16",
}  # fmt: skip
# A dtype name "autocast-<half>": the model in float32 under torch.autocast to that half dtype (what the Trainer's
# --bf16 / --fp16 do to a float32 model), judged by the half dtype's tolerance.
AUTOCAST = "autocast-"
DEFAULT_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}


@dataclass
class Plan:
    """The validated run: the cases, in order, and what the defaults left out on this machine, with why."""

    cases: list[tuple[str, str, str, str, str]]  # (family, backend, device, dtype name, convention)
    skipped: list[dict] = field(default_factory=list)  # {"backend"?, "device", "reason"}
    families: list[str] = field(default_factory=list)  # asked for (or all), this release's and the others


def supported_combos() -> dict[str, list[str]]:
    """Each device's dtype names that have a tolerance entry (``qwenvl.tolerances.TOLERANCES``), and for each half
    dtype among them its autocast name (``AUTOCAST``)."""
    import torch

    from qwenvl.tolerances import TOLERANCES

    combos: dict[str, list[str]] = {}
    for device, dtype in TOLERANCES:
        combos.setdefault(device, []).append(str(dtype).removeprefix("torch."))
    for device, dtype in TOLERANCES:
        if dtype in (torch.bfloat16, torch.float16):
            combos[device].append(AUTOCAST + str(dtype).removeprefix("torch."))
    return combos


def case_dtypes(name: str) -> dict:
    """``run_case``'s dtype keywords for a dtype name: ``{"dtype": ...}``, or for ``autocast-<half>`` a float32 model
    under autocast to the half dtype."""
    import torch

    if name.startswith(AUTOCAST):
        return {"dtype": torch.float32, "autocast": getattr(torch, name.removeprefix(AUTOCAST))}
    return {"dtype": getattr(torch, name)}


def _no_cuda_reason() -> str:
    import torch

    return f"torch {torch.__version__} sees no CUDA device"


def make_plan(parser: argparse.ArgumentParser, args) -> Plan:
    """Check every option against this machine (``parser.error`` on the first bad one), then decide what runs:
    every combination of the options' values, less what this release cannot run (``_release_limits``)."""
    import transformers

    from qwenvl.families import FAMILIES

    _check_json_path(parser, args.json)
    if args.markdown is not None:
        _check_json_path(parser, args.markdown, option="--markdown")
    skipped: list[dict] = []  # what the defaults leave out on this machine, in the order the checks find it
    devices = _devices(parser, args.device, skipped)
    # With the default devices, an option that only one of them refuses is fixed by naming the devices.
    hint = "; pass --device to choose the devices" if not args.device and len(devices) > 1 else ""
    dtypes = _dtypes(parser, args.dtype, devices, hint)
    backends = _backends(parser, args.backend, devices, hint, skipped)
    version = transformers.__version__
    asked = list(dict.fromkeys(args.family or FAMILIES))
    families = _families(parser, asked, bool(args.family), version, skipped)
    conventions = list(dict.fromkeys(args.packing_convention or CONVENTIONS))
    cases = [
        (family, backend, device, dtype, convention)
        for device in devices
        for family in families
        for backend in backends[device]
        for dtype in dtypes[device]
        for convention in conventions
    ]
    cases, limits = _release_limits(cases, families, version)
    return Plan(cases=cases, skipped=skipped + limits, families=asked)


def _devices(parser: argparse.ArgumentParser, asked: list[str] | None, skipped: list[dict]) -> list[str]:
    """``--device``: the devices asked for (cuda only where torch sees one); by default cpu, and cuda if present."""
    import torch

    if asked:
        devices = list(dict.fromkeys(asked))
        if "cuda" in devices and not torch.cuda.is_available():
            parser.error(f"argument --device: cuda was asked for but {_no_cuda_reason()}; choose from: cpu")
        return devices
    if torch.cuda.is_available():
        return ["cpu", "cuda"]
    skipped.append({"device": "cuda", "reason": _no_cuda_reason()})
    return ["cpu"]


def _dtypes(parser: argparse.ArgumentParser, asked: list[str] | None, devices: list[str], hint: str) -> dict[str, list[str]]:
    """``--dtype`` (aliases resolved), each checked to have a tolerance entry on every device; by default each
    device's own (``DEFAULT_DTYPES``)."""
    if not asked:
        return {device: [DEFAULT_DTYPES[device]] for device in devices}
    combos = supported_combos()
    names = list(dict.fromkeys(DTYPE_ALIASES.get(name, name) for name in asked))
    for device in devices:
        for dtype in names:
            if dtype not in combos.get(device, []):
                supported = "; ".join(f"{d}: {', '.join(n)}" for d, n in combos.items())
                parser.error(
                    f"argument --dtype: {dtype} on {device} has no tolerance entry (qwenvl.tolerances); "
                    f"supported: {supported}{hint}"
                )
    return {device: names for device in devices}


def _backends(
    parser: argparse.ArgumentParser, asked: list[str] | None, devices: list[str], hint: str, skipped: list[dict]
) -> dict[str, list[str]]:
    """``--backend``, each checked to run on every device; by default every backend available on each device
    (those that are not go to ``skipped`` with why)."""
    from qwenvl.attention import available_backends, unavailable_reason

    backends = {}
    for device in devices:
        if not asked:
            backends[device] = available_backends(device)
            for name in all_backends():
                why = unavailable_reason(name, device)
                if why is not None:
                    skipped.append({"backend": name, "device": device, "reason": why})
            continue
        backends[device] = list(dict.fromkeys(asked))
        for name in backends[device]:
            why = None if name == "auto" else unavailable_reason(name, device)
            if why is not None:
                parser.error(
                    f"argument --backend: {name} is not available on {device} ({why}); "
                    f"available on {device}: {', '.join(['auto', *available_backends(device)])}{hint}"
                )
    return backends


def _families(
    parser: argparse.ArgumentParser, asked: list[str], named: bool, version: str, skipped: list[dict]
) -> list[str]:
    """The families of ``asked`` this release has: one it lacks is an error where ``--family`` ``named`` it, and
    goes to ``skipped`` with why by default."""
    from qwenvl.families import FAMILIES

    families = []
    for family in asked:
        spec = FAMILIES[family]
        if spec.available(version):
            families.append(family)
            continue
        why = f"transformers {version} has no {family} (from {spec.min_transformers})"
        if named:
            here = ", ".join(f for f in FAMILIES if FAMILIES[f].available(version))
            parser.error(f"argument --family: {why}; available here: {here}")
        skipped.append({"family": family, "reason": why})
    return families


def _release_limits(cases: list, families: list[str], version: str) -> tuple[list, list[dict]]:
    """What of the cases this release can run (``qwenvl.verify.batches.release_run``, from FamilySpec.release_bugs):
    the cases kept, and a skip entry naming each limit.

    A family whose model cannot run in float64 has no oracle on the CPU: its cases there are left out (the golden
    check still judges its patch). A release that cannot run a family's videos at all (Qwen3-Omni on 5.0.0) runs
    its cases without the video.
    """
    import torch

    from qwenvl.tolerances import reference_dtype
    from qwenvl.verify.batches import release_run
    from qwenvl.verify.parity import DEFAULT_SPECS

    from qwenvl.families import get_family

    no_oracle, no_autocast = {}, {}
    for family, _, device, dtype, _ in cases:
        float64 = reference_dtype(device, case_dtypes(dtype)["dtype"]) == torch.float64
        why = release_run(family, float64=float64, version=version).left_out.get("float64")
        if why:
            no_oracle.setdefault((family, device, dtype), why)
        elif dtype.startswith(AUTOCAST) and (why := get_family(family).release_bug("autocast", version)):
            no_autocast.setdefault((family, device, dtype), why)
    cases = [case for case in cases if (case[0], case[2], case[3]) not in {**no_oracle, **no_autocast}]
    limits = [
        {"family": family, "device": device, "limit": f"no float64 oracle for {dtype} on {device}", "reason": why}
        for (family, device, dtype), why in no_oracle.items()
    ] + [
        {"family": family, "device": device, "limit": f"{dtype} cannot run on {device}", "reason": why}
        for (family, device, dtype), why in no_autocast.items()
    ]
    for family in families:
        why = release_run(family, DEFAULT_SPECS, version=version).left_out.get("videos")
        if why and any(case[0] == family for case in cases):
            limits.append({"family": family, "limit": "videos left out", "reason": why})
    return cases, limits


def specs_for(family: str, version: str):
    """``DEFAULT_SPECS``, less what the release cannot run of them (``release_run``; named in the plan)."""
    from qwenvl.verify.batches import release_run
    from qwenvl.verify.parity import DEFAULT_SPECS

    return release_run(family, DEFAULT_SPECS, version=version).specs


def all_backends() -> list[str]:
    """Every registered varlen attention backend, available here or not."""
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
