"""Golden tensors: what each tiny model computed under one pinned transformers release, and the drift check of
the installed release against them (``qwenvl verify``'s golden section, ``parity_tests/test_golden.py``).

Legend: T = packed tokens, S = samples, V = vocabulary, N = query heads, K = kv heads, H = head dim.

The files (``scripts/make_golden.py`` writes them under the pinned release; safetensors, framework-neutral)::

    fixtures/golden/manifest.json            versions, dtype, tolerance, the batch, the loss, sha256 of every file
    fixtures/golden/<fixture>.safetensors    per family:
        batch.input_ids          int64 (1, T)      five samples packed in one row:
        batch.cu_seqlens         int32 (S + 1,)      image (4x8 patches) | text | video (2x4x4) | 1 token | image (2x4)
        batch.position_ids       int64 (3, 1, T)   each sample's own mrope rows (get_rope_index of the pinned release)
        batch.pixel_values, batch.image_grid_thw, batch.pixel_values_videos, batch.video_grid_thw
        batch.images_per_sample, batch.videos_per_sample   int64 (S,)
        batch.rows               int64 (R + 1,)    where each packed row starts: one row, except for a family whose
                                                   images and videos cannot share a forward (GLM-4V: images in one
                                                   row, the rest in a second; ``split_by_media``)
        logits.ref   float64 (T, V)   each sample alone through the unpatched model in float64    the oracle
        logits.pt    float32 (T, V)   the same in float32                                         the yardstick
        grad.ref.<param>, grad.pt.<param>   gradients of the loss below for the selected parameters
        attn.{text,vision}.{q,k,v}   float32 (T, N|K, H)   one layer's attention inputs in the patched packed
                                                          forward (text: the first attention layer, causal;
                                                          vision: block 0 with its own cu_seqlens)
        attn.{text,vision}.cu_seqlens int32, .window int64 (2,), .causal int64 (1,), .scale float64 (1,)
        attn.{text,vision}.out_ref float64, .out_pt float32   qwenvl.reference.attention_ref on them
    weights: fixtures/models/<fixture>/model.safetensors (the embedded tiny model, a transformers checkpoint;
             its sha256 and its config's are in the manifest)

    loss = sum(logits * W),  W[t, v] = cos(0.7 t + 1.3 v) / T   (linear in the logits: its gradients do not
                                                                  compound the logits' rounding)

The check, per family, on the installed release (CPU; float32 judged against the float64 oracle by the one rule,
``qwenvl.tolerances.judge``, k and the absolute cap from the (cpu, float32) entry)::

    unpatched   each sample alone, fp32, golden positions   vs golden ref (yardstick: golden pt)
    patched     the packed row(s), fp32, qwenvl.patch       vs golden ref (yardstick: golden pt)
    here        the packed row(s), patched                  vs this release's own fp64 unpatched run
                                                            (yardstick: its own fp32 unpatched run)

    unpatched and patched in bound         exact
    unpatched out of bound, here in bound  transformers changed (the model's maths moved; the patch is still exact)
    here out of bound                      our patch differs
    patched alone out of bound             our patch differs (from the golden)

Different releases may order float operations differently or move an fp32 cast (the text rotary embedding is
computed in explicit fp32 in some releases): such a change moves fp32 results by about the fp32 rounding error,
which the yardstick measures, so it stays in bound; a change of the maths does not. The drift is reported as
numbers either way: each error, its bound, and ``ref_drift``, the largest difference between this release's
float64 run and the golden float64 one (below 1e-15 when nothing moved; measured 1e-7 for Qwen3-VL on 4.57-5.10,
an fp32 step inside the fp64 model).

Where each job lives (everything below is importable from here, as it always was)::

    qwenvl.verify.golden_files   the file facts (batch specs and seed, recorded gradients, the loss) and loading
    qwenvl.verify.golden_rows    the stored batch read back, and its packed rows
    qwenvl.verify.golden_runs    the tiny model on this release, each sample alone (unpatched), the rows patched
    qwenvl.verify.drift          comparing by the rule, the statuses above, the per-family and whole results
    qwenvl.verify.golden         (this module) the check of one family and of all of them, on the installed release

What a release cannot run at all (a video of Qwen3-Omni on 5.0.0, a float64 GLM-4V-MoE on 4.57) is decided by
``qwenvl.verify.batches.release_run``, as for the parity cases: such a batch is skipped, naming the bug, and without
a float64 run the patch is judged against the golden alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from qwenvl.families import FAMILIES, get_family
from qwenvl.data.vision_meta import VisionPreamble
from qwenvl.verify.batches import PackedBatch, mixes_media, release_run
from qwenvl.verify.drift import (
    BOTH,
    ERROR,
    EXACT,
    KNOWN_DRIFT,
    MISSING,
    PATCH_DIFFERS,
    SKIPPED,
    TRANSFORMERS_CHANGED,
    Comparison,
    FamilyDrift,
    GoldenReport,
    classify,
    compare,
    known_drift,
)
from qwenvl.verify.golden_files import (
    GOLDEN_SEED,
    GOLDEN_SPECS,
    GRAD_PATTERNS,
    RECORDED_WITHOUT_DEEPSTACK,
    _check_files as _check_files,  # parity_tests read it here (test_golden, test_jax_interop)
    golden_dir,
    grad_patterns,
    load_golden,
    load_manifest,
    loss_weights,
    selected_parameters,
    sha256,
)
from qwenvl.verify.golden_rows import concat_rows, golden_batch, golden_rows
from qwenvl.verify.golden_runs import float64_copy, golden_model, one_thread
from qwenvl.verify.runs import run_alone, run_packed

__all__ = [
    "GOLDEN_SPECS",
    "GOLDEN_SEED",
    "GRAD_PATTERNS",
    "RECORDED_WITHOUT_DEEPSTACK",
    "grad_patterns",
    "KNOWN_DRIFT",
    "known_drift",
    "EXACT",
    "TRANSFORMERS_CHANGED",
    "PATCH_DIFFERS",
    "BOTH",
    "SKIPPED",
    "MISSING",
    "ERROR",
    "classify",
    "float64_copy",
    "Comparison",
    "FamilyDrift",
    "GoldenReport",
    "golden_dir",
    "load_manifest",
    "load_golden",
    "golden_model",
    "golden_batch",
    "golden_rows",
    "concat_rows",
    "loss_weights",
    "selected_parameters",
    "run_alone",
    "run_packed",
    "compare",
    "check_family",
    "check_golden",
    "one_thread",
    "sha256",
]

def check_family(family: str, *, tensors: dict[str, torch.Tensor] | None = None, root: Path | None = None) -> FamilyDrift:
    """The golden check of ``family`` on the installed release (``tensors``: golden tensors to use instead of the
    files, for tests)."""
    with one_thread():
        return _check_family(family, tensors=tensors, root=root)


def _check_family(family: str, *, tensors, root) -> FamilyDrift:
    start = time.perf_counter()
    tensors, unchecked = _golden_tensors(family, tensors, root)
    if unchecked is not None:
        return unchecked
    batch = golden_batch(tensors)
    # What this release cannot run at all, unpatched (release_run: FamilySpec.release_bugs names the transformers
    # bug): say so. A row mixing images and videos where one forward cannot is split (golden_rows), as the data
    # pipeline would.
    limits = release_run(family, videos=batch.video_grid_thw is not None, float64=True).left_out
    if "videos" in limits:
        return FamilyDrift(family, SKIPPED, f"the golden batch cannot run here: {limits['videos']}")
    no_float64 = limits.get("float64")
    result = _judge(family, tensors, _run(family, tensors, batch, float64=not no_float64))
    if no_float64:
        result.reason = "; ".join(filter(None, [result.reason, f"patch judged against the golden only ({no_float64})"]))
    if result.status == TRANSFORMERS_CHANGED and known_drift(family):
        result.reason = f"{result.reason}; known: {known_drift(family)}"
    result.seconds = time.perf_counter() - start
    return result


def _golden_tensors(family: str, tensors, root) -> tuple[dict | None, FamilyDrift | None]:
    """The golden tensors to check ``family`` against (``tensors`` where given), or the result saying why it is
    not checked (not in this release, no golden, a file that fails its sha256)."""
    import transformers

    spec = get_family(family)
    if not spec.available():
        why = f"transformers {transformers.__version__} has no {family} (from {spec.min_transformers})"
        return None, FamilyDrift(family, SKIPPED, why)
    if tensors is not None:
        return tensors, None
    try:
        manifest = load_manifest(root)
    except FileNotFoundError as exc:
        return None, FamilyDrift(family, MISSING, str(exc))
    if family not in manifest["families"]:
        return None, FamilyDrift(family, MISSING, f"no golden tensors for {family}: run scripts/make_golden.py")
    try:
        return load_golden(family, root), None
    except (ValueError, FileNotFoundError) as exc:
        return None, FamilyDrift(family, ERROR, str(exc))


@dataclass
class _Runs:
    """This release's outputs on the golden batch, each ``(logits (T, V), gradients)``."""

    unpatched: tuple  # each sample alone, float32, golden positions
    patched: tuple  # the packed row(s), float32, qwenvl.patch
    here_ref: tuple | None  # each sample alone, float64 (None: the release cannot run the model in float64)
    positions_same: bool  # this release's get_rope_index gives the golden positions


def _run(family: str, tensors: dict[str, torch.Tensor], batch: PackedBatch, *, float64: bool) -> _Runs:
    """The golden batch through this release's model: unpatched (float64 where ``float64``, float32) and patched."""
    row_starts = tensors["batch.rows"].tolist() if "batch.rows" in tensors else [0, batch.input_ids.shape[1]]
    names = [k.removeprefix("grad.ref.") for k in tensors if k.startswith("grad.ref.")]
    model = golden_model(family)
    batch = PackedBatch(batch.items, family, VisionPreamble.of(model))  # the rows as the trainer's collator makes them
    rows, index = golden_rows(batch, row_starts, config=None if mixes_media(family) else model.config)
    positions_same = _positions_same(model, batch)
    weights = loss_weights(batch.input_ids.shape[1], model.config.text_config.vocab_size)
    here_ref = run_alone(float64_copy(model), [batch], weights, names=names) if float64 else None
    unpatched = run_alone(model, [batch], weights, names=names)
    patched = run_packed(model, rows, weights, index=index, names=names, backend="sdpa")
    return _Runs(unpatched, patched, here_ref, positions_same)


def _judge(family: str, tensors: dict[str, torch.Tensor], runs: _Runs) -> FamilyDrift:
    """The three comparisons of the module docstring, the fp64 drift, and the status they give."""
    ref = (tensors["logits.ref"], _recorded_grads(tensors, "ref"))
    pt = (tensors["logits.pt"], _recorded_grads(tensors, "pt"))
    unpatched = compare(*runs.unpatched, *ref, *pt)
    patched = compare(*runs.patched, *ref, *pt)
    here, ref_drift = None, None
    if runs.here_ref is not None:
        here = compare(*runs.patched, *runs.here_ref, *runs.unpatched)
        ref_drift = max(_max_diff({"logits": runs.here_ref[0]}, {"logits": ref[0]}), _max_diff(runs.here_ref[1], ref[1]))
    status, reason = classify(unpatched, patched, here, runs.positions_same)
    return FamilyDrift(
        family=family,
        status=status,
        reason=reason,
        positions_same=runs.positions_same,
        unpatched=unpatched,
        patched=patched,
        here=here,
        ref_drift=ref_drift,
    )


def _recorded_grads(tensors: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
    """The recorded gradients of the oracle (``which="ref"``) or the yardstick (``"pt"``), by parameter name."""
    prefix = f"grad.{which}."
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _positions_same(model, batch: PackedBatch) -> bool:
    """Whether this release's ``get_rope_index`` gives each sample the positions the golden batch holds."""
    from qwenvl.positions import rope_index

    cu = batch.cu_seqlens.tolist()
    for sample, start, end in zip(batch.samples, cu[:-1], cu[1:]):
        mine = rope_index(
            model, sample.input_ids[None], image_grid_thw=sample.image_grid_thw, video_grid_thw=sample.video_grid_thw
        )[:, 0]
        if not torch.equal(mine, batch.position_ids[:, 0, start:end]):
            return False
    return True


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diffs = [(a[k].double() - b[k].double()).abs().max().item() for k in a if k in b and a[k].shape == b[k].shape and a[k].numel()]
    return max(diffs, default=0.0)


def check_golden(families: Sequence[str] | None = None, *, root: Path | None = None, progress=None) -> GoldenReport:
    """The golden check of ``families`` (default: every family of ``FAMILIES``) on the installed release."""
    import transformers

    try:
        manifest = load_manifest(root)
    except FileNotFoundError:
        manifest = {}
    report = GoldenReport(transformers.__version__, manifest.get("transformers"), manifest.get("torch"))
    for family in families or list(FAMILIES):
        try:
            result = check_family(family, root=root)
        except Exception as exc:  # a crash is a reported error of that family, not a traceback hiding the rest
            result = FamilyDrift(family, ERROR, f"{type(exc).__name__}: {exc}")
        report.families.append(result)
        if progress is not None:
            progress(result)
    return report
