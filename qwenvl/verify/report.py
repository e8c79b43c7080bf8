"""What ``qwenvl verify`` tells a person: the cases table, the line naming what was skipped, the backend/device
coverage, the golden drift table, the last line, and the whole report as Markdown. Everything here reads the JSON
report (a plain dict, or its rows), so a report written on one machine renders the same anywhere.

The last line names the release, how many families are exact (every parity case passed and the golden check
found nothing), how many drifted, and what to do::

    transformers 5.24.0: 6/6 families exact, 0 drift; 54/54 cases passed: safe to train packed on this release
"""

from __future__ import annotations

import math

__all__ = ["coverage", "cases_table", "case_detail", "skipped_line", "golden_table", "last_line", "to_markdown", "finite"]

_DRIFT = ("transformers changed", "transformers changed; our patch differs")
_OURS = ("our patch differs", "transformers changed; our patch differs", "error")


def finite(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON proper has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def absent_families(skipped: list[dict]) -> list[dict]:
    """The skip entries of families the installed release does not have (not those it runs with a limit)."""
    return [s for s in skipped if "family" in s and "limit" not in s]


def limited_families(skipped: list[dict]) -> list[dict]:
    """The skip entries of families that ran with a release's limit (no CPU float64 oracle, videos left out)."""
    return [s for s in skipped if "limit" in s]


def coverage(cases: list[dict], skipped: list[dict]) -> list[dict]:
    """One row per (device, backend): what ran (cases, passed, dtypes, conventions, families) or why not."""
    rows: dict[tuple[str, str], dict] = {}
    for case in cases:
        row = rows.setdefault(
            (case["device"], case["backend"]),
            {"device": case["device"], "backend": case["backend"], "cases": 0, "passed": 0, "dtypes": [], "conventions": [], "families": [], "reason": None},
        )
        row["cases"] += 1
        row["passed"] += bool(case["passed"])
        for key, value in (("dtypes", case["dtype"]), ("conventions", case["convention"]), ("families", case["family"])):
            if value not in row[key]:
                row[key].append(value)
    for entry in skipped:
        if "family" in entry:
            continue
        backend = entry.get("backend", "*")
        rows.setdefault(
            (entry["device"], backend),
            {"device": entry["device"], "backend": backend, "cases": 0, "passed": 0, "dtypes": [], "conventions": [], "families": [], "reason": entry["reason"]},
        )
    return sorted(rows.values(), key=lambda r: (r["device"], r["cases"] == 0, r["backend"]))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def _text_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    """Plain-text columns, left-aligned to the widest cell, the header underlined with dashes."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_CASES_HEADER = ("family", "backend", "device", "dtype", "convention", "logits err", "bound", "grad err", "bound", "pass")


def _first(case: dict) -> tuple[str, str]:
    """A case's logits error and bound; the loss's, marked, where it was judged instead (``--fused_cross_entropy``)."""
    if case.get("loss_err") is not None:
        return f"loss {_fmt(case['loss_err'])}", f"loss {_fmt(case['loss_bound'])}"
    return _fmt(case["logits_err"]), _fmt(case["logits_bound"])


def cases_table(cases: list[dict]) -> str:
    """The parity cases as a plain-text table: the worst logits and gradient errors with their bounds, PASS/FAIL."""
    rows = [
        (
            c["family"], c["backend"], c["device"], c["dtype"], c["convention"], *_first(c),
            _fmt(c["grad_err"]), _fmt(c["grad_bound"]), "PASS" if c["passed"] else "FAIL",
        )
        for c in cases
    ]
    return _text_table(_CASES_HEADER, rows)


def case_detail(case: dict) -> str:
    """A case's numbers in a few words (its error, where it crashed)."""
    judged = "loss" if case.get("loss_err") is not None else "logits"
    return case.get("error") or f"{judged} {_fmt(case[judged + '_err'])}, grads {_fmt(case['grad_err'])}"


def skipped_line(skipped: list[dict]) -> str:
    """One line naming everything a run left out, each with why: devices, backends, families, a release's limits."""
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


def _pair(comparison: dict | None) -> str:
    if not comparison:
        return "-"
    return f"{_fmt(comparison['logits_err'])} / {_fmt(comparison['logits_bound'])}"


def _ratio(comparison: dict | None) -> str:
    if not comparison or comparison.get("ratio") is None:
        return "-"
    return f"{comparison['ratio']:.2f}"


def _golden_rows(golden: dict) -> list[tuple[str, ...]]:
    rows = []
    for fam in golden["families"]:
        positions = {True: "same", False: "differ", None: "-"}[fam["positions_same"]]
        rows.append(
            (
                fam["family"],
                fam["status"],
                positions,
                _pair(fam["unpatched"]),
                _ratio(fam["unpatched"]),
                _pair(fam["patched"]),
                _ratio(fam["patched"]),
                _ratio(fam["here"]),
                _fmt(fam["ref_drift"]),
                fam["reason"] or "",
            )
        )
    return rows


_GOLDEN_HEADER = (
    "family", "status", "positions", "unpatched logits err / bound", "x bound", "patched logits err / bound", "x bound",
    "patch here x bound", "fp64 drift", "why",
)


def golden_table(golden: dict) -> str:
    """The golden drift section as a plain-text table (``x bound``: the worst error over its bound, logits and
    gradients; <= 1 is in bound)."""
    rows = [tuple(r[:-1]) for r in _golden_rows(golden)]
    notes = [f"  {r[0]}: {r[-1]}" for r in _golden_rows(golden) if r[-1]]
    return "\n".join([_text_table(_GOLDEN_HEADER[:-1], rows), *notes])


def _family_verdicts(report: dict) -> tuple[list[str], list[str], list[str], list[str]]:
    """(checked, exact, drifted, ours) family names."""
    cases = report.get("cases", [])
    golden = {f["family"]: f for f in (report.get("golden") or {}).get("families", [])}
    absent = {s["family"] for s in absent_families(report.get("skipped", []))}
    checked = list(dict.fromkeys([c["family"] for c in cases] + [f for f, g in golden.items() if g["status"] not in ("skipped", "no golden")]))
    checked = [f for f in checked if f not in absent]
    exact, drifted, ours = [], [], []
    for family in checked:
        failed_case = any(not c["passed"] for c in cases if c["family"] == family)
        status = golden.get(family, {}).get("status", "exact")
        if status in _DRIFT:
            drifted.append(family)
        if failed_case or status in _OURS:
            ours.append(family)
        elif status in ("exact", "no golden", "skipped"):
            exact.append(family)
    return checked, exact, drifted, ours


def last_line(report: dict) -> str:
    """One line a person can act on."""
    checked, exact, drifted, ours = _family_verdicts(report)
    cases = report.get("cases", [])
    passed = sum(bool(c["passed"]) for c in cases)
    absent = [s["family"] for s in absent_families(report.get("skipped", []))]
    limited = limited_families(report.get("skipped", []))
    golden = {f["family"]: f for f in (report.get("golden") or {}).get("families", [])}
    line = f"transformers {report['transformers']}: {len(exact)}/{len(checked)} families exact, {len(drifted)} drift"
    if drifted:
        known = [f for f in drifted if "known:" in (golden[f].get("reason") or "")]
        line += f" ({', '.join(f + (' (known)' if f in known else '') for f in drifted)})"
    if absent:
        line += f", {len(absent)} not in this release"
    line += f"; {passed}/{len(cases)} cases passed"
    if limited:
        line += " (transformers bugs limit " + "; ".join(f"{s['family']}: {s['limit']}" for s in limited) + ")"
    if not golden:
        line += ", golden check not run"
    without = [f for f, g in golden.items() if g["status"] == "no golden" or (g["status"] == "skipped" and f not in absent)]
    if without:
        line += f", {len(without)} without a golden check here ({', '.join(without)})"
    if ours or not cases:
        what = ", ".join(ours) if ours else "no case ran"
        return f"{line}: our patch is not exact here ({what}): do not train packed on this release; see the FAIL rows"
    if drifted:
        return f"{line}: the model maths moved but the patch is still exact: safe to train packed; see the golden section"
    return f"{line}: safe to train packed on this release"


def to_markdown(report: dict) -> str:
    """The whole report as Markdown: summary, environment, coverage, golden drift, the cases."""
    out = [f"# qwenvl verify: transformers {report['transformers']}", "", f"**{report.get('summary') or last_line(report)}**", ""]
    out += [
        "| transformers | torch | python | GPU |",
        "|---|---|---|---|",
        f"| {report['transformers']} | {report['torch']} | {report.get('python', '-')} | {report.get('gpu') or 'none'} |",
        "",
        "## Backend and device coverage",
        "",
        "| device | backend | cases | passed | dtypes | conventions | families / why not run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report.get("coverage", []):
        if row["cases"]:
            out.append(
                f"| {row['device']} | {row['backend']} | {row['cases']} | {row['passed']} | {', '.join(row['dtypes'])} | "
                f"{', '.join(row['conventions'])} | {', '.join(row['families'])} |"
            )
        else:
            out.append(f"| {row['device']} | {row['backend']} | 0 | - | - | - | not run: {row['reason']} |")
    absent = absent_families(report.get("skipped", []))
    if absent:
        out += ["", "Families not in this release: " + "; ".join(f"{s['family']} ({s['reason']})" for s in absent) + "."]
    limited = limited_families(report.get("skipped", []))
    if limited:
        out += ["", "Run with a release's limit: " + "; ".join(f"{s['family']}: {s['limit']} ({s['reason']})" for s in limited) + "."]
    golden = report.get("golden")
    out += ["", "## Golden drift", ""]
    if not golden:
        out.append("Not run (`--no_golden`).")
    else:
        out += [
            f"Each family's tiny model against the tensors recorded under transformers {golden['golden_transformers']} "
            f"(torch {golden['golden_torch']}), on {golden['device']} in {golden['dtype']} against the float64 oracle, by "
            "the tolerance rule (`qwenvl.tolerances.judge`). *unpatched*: each sample alone, unpatched (does transformers "
            "compute what it did?); *patched*: the packed row, patched; *patch here*: patched against this release's own "
            "unpatched model (is our patch exact here?); *x bound*: the worst error over its bound, <= 1 passes; "
            "*fp64 drift*: this release's float64 outputs against the recorded ones.",
            "",
            "| " + " | ".join(_GOLDEN_HEADER) + " |",
            "|" + "---|" * len(_GOLDEN_HEADER),
        ]
        out += ["| " + " | ".join(row) + " |" for row in _golden_rows(golden)]
    out += [
        "",
        "## Parity cases",
        "",
        "| family | backend | device | dtype | convention | logits err | bound | grad err | bound | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report.get("cases", []):
        result = "PASS" if c["passed"] else f"FAIL {c.get('error') or ''}".strip()
        err, bound = _first(c)
        out.append(
            f"| {c['family']} | {c['backend']} | {c['device']} | {c['dtype']} | {c['convention']} | {err} | "
            f"{bound} | {_fmt(c['grad_err'])} | {_fmt(c['grad_bound'])} | {result} |"
        )
    return "\n".join(out) + "\n"
