"""The verdicts of the golden check: one output judged against a reference by the tolerance rule (``compare``:
``qwenvl.verify.runs.judge_runs``, as for every case, giving a ``Comparison``), the status a family gets from its three comparisons (``classify``: exact, transformers
changed, our patch differs), the result of one family (``FamilyDrift``) and of the whole check (``GoldenReport``),
and the drift a person has looked at and explained (``KNOWN_DRIFT``). What the statuses mean is told in
``qwenvl.verify.golden``'s docstring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from qwenvl.tolerances import tolerance
from qwenvl.verify.runs import Comparison, judge_runs

__all__ = [
    "KNOWN_DRIFT",
    "known_drift",
    "EXACT",
    "TRANSFORMERS_CHANGED",
    "PATCH_DIFFERS",
    "BOTH",
    "SKIPPED",
    "MISSING",
    "ERROR",
    "Comparison",
    "compare",
    "classify",
    "FamilyDrift",
    "GoldenReport",
]

# Drift a person has looked at and explained: family -> (the first release without it, what moved). It is still
# reported as "transformers changed" (the numbers say how much); the explanation goes with it.
KNOWN_DRIFT = {
    "qwen2_5_vl": (
        "5.10.0",
        "get_rope_index puts the text after a video one position later (seen on 4.57.6 and 5.0.0; 5.10.4 and "
        "later match the goldens)",
    ),
}

EXACT = "exact"
TRANSFORMERS_CHANGED = "transformers changed"
PATCH_DIFFERS = "our patch differs"
BOTH = "transformers changed; our patch differs"
SKIPPED = "skipped"
MISSING = "no golden"
ERROR = "error"


def compare(
    logits: torch.Tensor,
    grads: dict[str, torch.Tensor],
    ref_logits: torch.Tensor,
    ref_grads: dict[str, torch.Tensor],
    pt_logits: torch.Tensor,
    pt_grads: dict[str, torch.Tensor],
) -> Comparison:
    """``qwenvl.verify.runs.judge_runs`` with the cpu/float32 k and absolute cap (the golden runs' setting)."""
    return judge_runs(tolerance("cpu", torch.float32), (logits, grads), (ref_logits, ref_grads), (pt_logits, pt_grads))


@dataclass
class FamilyDrift:
    """The golden check of one family on the installed release."""

    family: str
    status: str
    reason: str = ""
    positions_same: bool | None = None
    unpatched: Comparison | None = None
    patched: Comparison | None = None
    here: Comparison | None = None
    ref_drift: float | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """Our patch is wrong here (a drift of transformers alone is reported, not failed)."""
        return self.status in (PATCH_DIFFERS, BOTH, ERROR)

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("unpatched", "patched", "here"):
            if out[key] is not None:
                out[key]["ratio"] = getattr(self, key).ratio
        return out

def known_drift(family: str, version: str | None = None) -> str | None:
    """The explanation of a drift of ``family`` that is known on the installed (or given) release, or ``None``."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    known = KNOWN_DRIFT.get(family)
    if known is None or Version(Version(version).base_version) >= Version(known[0]):
        return None
    return known[1]


def classify(unpatched: Comparison, patched: Comparison, here: Comparison | None, positions_same: bool) -> tuple[str, str]:
    """The status and a one-line reason, from the three comparisons (see the module docstring). ``here`` is
    ``None`` where this release cannot run the float64 oracle; the patch is then judged against the golden alone."""
    moved = not unpatched.passed or not positions_same
    what = []
    if not unpatched.passed:
        what.append(f"unpatched model vs golden: {unpatched.why} {unpatched.ratio:.2g}x its bound")
    if not positions_same:
        what.append("get_rope_index gives other positions")
    if here is None and moved and not patched.passed:
        what.append("no float64 run on this release to tell whether the patch is still exact")
        return TRANSFORMERS_CHANGED, "; ".join(what)
    if here is not None and not here.passed:
        what.append(f"patched vs this release's unpatched model: {here.why} {here.ratio:.2g}x its bound")
        return (BOTH if moved else PATCH_DIFFERS), "; ".join(what)
    if moved:
        return TRANSFORMERS_CHANGED, "; ".join(what) + " (the patch is still exact on this release)"
    if not patched.passed:
        return PATCH_DIFFERS, f"patched vs golden: {patched.why} {patched.ratio:.2g}x its bound"
    return EXACT, ""


@dataclass
class GoldenReport:
    """The golden section of ``qwenvl verify``: one ``FamilyDrift`` per family, and where the goldens came from."""

    transformers: str
    golden_transformers: str | None
    golden_torch: str | None
    families: list[FamilyDrift] = field(default_factory=list)

    def count(self, *statuses: str) -> int:
        return sum(f.status in statuses for f in self.families)

    @property
    def checked(self) -> list[FamilyDrift]:
        return [f for f in self.families if f.status not in (SKIPPED, MISSING)]

    @property
    def failed(self) -> bool:
        return any(f.failed for f in self.families)

    def as_dict(self) -> dict:
        return {
            "transformers": self.transformers,
            "golden_transformers": self.golden_transformers,
            "golden_torch": self.golden_torch,
            "device": "cpu",
            "dtype": "float32",
            "exact": self.count(EXACT),
            "transformers_changed": self.count(TRANSFORMERS_CHANGED, BOTH),
            "patch_differs": self.count(PATCH_DIFFERS, BOTH),
            "families": [f.as_dict() for f in self.families],
        }
