"""The golden files: what ``scripts/make_golden.py`` records (the batch's sample specs and seed, which gradients, the
loss) and reading it back, every file checked against its sha256 in the manifest first.

The layout of ``fixtures/golden/`` is described in ``qwenvl.verify.golden`` (the public face of the golden check);
this module holds the facts that layout is built from, so the writer and the reader share them.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import torch

from qwenvl.families import FamilySpec, family_of_model
from qwenvl.verify.batches import SampleSpec
from qwenvl.verify.runs import loss_weights

__all__ = [
    "GOLDEN_SPECS",
    "GOLDEN_SEED",
    "GRAD_PATTERNS",
    "RECORDED_WITHOUT_DEEPSTACK",
    "grad_patterns",
    "golden_dir",
    "sha256",
    "load_manifest",
    "load_golden",
    "loss_weights",
    "selected_parameters",
]

# The packed row: images (Qwen2.5-VL: a 4x8 grid spans two attention windows), plain text, a video of two
# temporal groups, a one-token sample.
GOLDEN_SPECS = (
    SampleSpec(text=5, image=(4, 8)),
    SampleSpec(text=8),
    SampleSpec(text=3, video=(2, 4, 4)),
    SampleSpec(text=1),
    SampleSpec(text=4, image=(2, 4)),
)
GOLDEN_SEED = 0

# Parameters whose gradients are recorded (every match): one of each kind of layer that touches packing, kept
# small (the whole fixture set stays a few MB). ``{deepstack}`` is filled in per family (``grad_patterns``).
GRAD_PATTERNS = (
    r"language_model\.layers\.\d+\.self_attn\.k_proj\.weight$",  # text attention (kv heads)
    r"language_model\.layers\.\d+\.self_attn\.(q_proj\.bias|q_norm\.weight)$",
    r"language_model\.layers\.\d+\.linear_attn\.(conv1d\.weight|A_log|dt_bias|in_proj_b\.weight)$",  # Gated DeltaNet
    r"language_model\.layers\.\d+\.mlp\.gate\.weight$",  # the MoE router
    r"language_model\.norm\.weight$",
    r"visual\.blocks\.0\.attn\.qkv\.weight$",
    r"visual\.blocks\.\d+\.attn\.qkv\.bias$",  # every vision block (Qwen2.5-VL: windowed and full)
    r"visual\.(merger{deepstack})\.(ln_q|norm)\.weight$",  # the projectors: the merger, each deepstack merger
)

# Families whose goldens were recorded without their deepstack mergers' gradients: recorded when the projector
# pattern named Qwen3-VL's list (``deepstack_merger_list``) and missed the Qwen3-Omni thinker's (``merger_list``).
# Recording still leaves them out for these, so that a rebuild (``scripts/make_golden.py --check``) reproduces the
# goldens on disk (the golden check itself compares the names a golden file holds). Drop a family from here when
# re-recording its goldens.
RECORDED_WITHOUT_DEEPSTACK: frozenset[str] = frozenset({"qwen3_omni_moe_thinker"})


def golden_dir() -> Path:
    """``fixtures/golden`` (``qwenvl.fixtures``'s ``golden/`` once installed)."""
    return Path(str(resources.files("qwenvl.fixtures").joinpath("golden")))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_manifest(root: Path | None = None) -> dict:
    path = (root or golden_dir()) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no golden manifest at {path}: run scripts/make_golden.py")
    return json.loads(path.read_text())


def _family_files(entry: dict, root: Path) -> dict[str, Path]:
    """The files one manifest entry pins, by their manifest-relative names."""
    return {name: (root / name).resolve() for name in entry["files"]}


def _check_files(entry: dict, root: Path) -> str | None:
    for name, path in _family_files(entry, root).items():
        if not path.is_file():
            return f"{name} is missing"
        if sha256(path) != entry["files"][name]:
            return f"{name} does not match its sha256 in fixtures/golden/manifest.json (regenerate: scripts/make_golden.py)"
    return None


def load_golden(family: str, root: Path | None = None) -> dict[str, torch.Tensor]:
    """The golden tensors of ``family`` (after checking every file's sha256 against the manifest)."""
    from safetensors.torch import load_file

    root = root or golden_dir()
    entry = load_manifest(root)["families"].get(family)
    if entry is None:
        raise KeyError(f"no golden tensors for {family}: run scripts/make_golden.py")
    problem = _check_files(entry, root)
    if problem:
        raise ValueError(f"golden files of {family}: {problem}")
    return load_file(root / entry["tensors"])


def grad_patterns(spec: FamilySpec, *, deepstack: bool = True) -> tuple[str, ...]:
    """``GRAD_PATTERNS`` for one family: its deepstack mergers (``FamilySpec.deepstack_mergers``) among the
    projectors (unless ``deepstack`` is false)."""
    name = spec.deepstack_mergers if deepstack else None
    alternative = "" if name is None else rf"|{re.escape(name)}\.\d+"
    return tuple(pattern.replace("{deepstack}", alternative) for pattern in GRAD_PATTERNS)


def selected_parameters(model) -> list[str]:
    """The parameters whose gradients the golden files record for ``model``'s family, in ``named_parameters``
    order (``RECORDED_WITHOUT_DEEPSTACK``: without the deepstack mergers where its goldens were recorded so)."""
    spec = family_of_model(model)
    patterns = [re.compile(p) for p in grad_patterns(spec, deepstack=spec.name not in RECORDED_WITHOUT_DEEPSTACK)]
    return [name for name, _ in model.named_parameters() if any(p.search(name) for p in patterns)]
