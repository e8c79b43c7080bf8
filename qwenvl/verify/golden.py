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
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from qwenvl.families import FAMILIES, get_family
from qwenvl.tolerances import judge, tolerance
from qwenvl.verify.batches import PackedBatch, Sample, SampleSpec

__all__ = [
    "GOLDEN_SPECS",
    "GRAD_PATTERNS",
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
    "run_unpatched",
    "run_patched",
    "compare",
    "check_family",
    "check_golden",
    "one_thread",
    "sha256",
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
# small (the whole fixture set stays a few MB).
GRAD_PATTERNS = (
    r"language_model\.layers\.\d+\.self_attn\.k_proj\.weight$",  # text attention (kv heads)
    r"language_model\.layers\.\d+\.self_attn\.(q_proj\.bias|q_norm\.weight)$",
    r"language_model\.layers\.\d+\.linear_attn\.(conv1d\.weight|A_log|dt_bias|in_proj_b\.weight)$",  # Gated DeltaNet
    r"language_model\.layers\.\d+\.mlp\.gate\.weight$",  # the MoE router
    r"language_model\.norm\.weight$",
    r"visual\.blocks\.0\.attn\.qkv\.weight$",
    r"visual\.blocks\.\d+\.attn\.qkv\.bias$",  # every vision block (Qwen2.5-VL: windowed and full)
    r"visual\.(merger|deepstack_merger_list\.\d+)\.(ln_q|norm)\.weight$",  # the projectors
)

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


def loss_weights(total: int, vocab: int) -> torch.Tensor:
    """float64 ``(T, V)``: ``W[t, v] = cos(0.7 t + 1.3 v) / T`` (a formula, so any framework can rebuild it)."""
    t = torch.arange(total, dtype=torch.float64)[:, None]
    v = torch.arange(vocab, dtype=torch.float64)[None, :]
    return torch.cos(0.7 * t + 1.3 * v) / total


def selected_parameters(model) -> list[str]:
    """The parameters whose gradients the golden files hold, in ``named_parameters`` order."""
    patterns = [re.compile(p) for p in GRAD_PATTERNS]
    return [name for name, _ in model.named_parameters() if any(p.search(name) for p in patterns)]


def _transpose_fused_experts(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 5.x checkpoint for a release that keeps fused MoE experts transposed (4.x: gate_up (E, H, 2I), down
    (E, I, H); 5.x: (E, 2I, H), (E, H, I)). The layout is read from ``down_proj``, which is never square in the
    fixtures; ``gate_up_proj`` may be (2I == H) and follows it."""
    own = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if not key.endswith("experts.down_proj"):
            continue
        if own[key].shape == value.shape:
            continue
        if own[key].shape != value.transpose(-1, -2).shape:
            raise ValueError(f"{key}: checkpoint {tuple(value.shape)} fits neither layout of {tuple(own[key].shape)}")
        prefix = key[: -len("down_proj")]
        for name in ("down_proj", "gate_up_proj"):
            out[prefix + name] = state[prefix + name].transpose(-1, -2).contiguous()
    return out


def golden_model(family: str):
    """The family's embedded tiny model, float32, eval mode, sdpa attention, loaded on the installed release.

    ``from_pretrained`` reads the checkpoint (each release maps its own key names). A release that cannot
    (transformers 4.x refuses Qwen3-VL-MoE's fused experts, written by 5.x transposed) gets the tensors loaded
    directly, the experts transposed into its layout.
    """
    import transformers

    from qwenvl.fixtures import model_dir

    spec = get_family(family)
    folder = model_dir(family)  # FileNotFoundError naming scripts/make_fixtures.py when it is missing
    cls = getattr(transformers, spec.entry_classes[0])
    transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(folder, attn_implementation="sdpa")
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        from safetensors.torch import load_file

        from qwenvl.fixtures import tiny_model

        model = tiny_model(family)
        state = load_file(folder / "model.safetensors")
        model.load_state_dict(_transpose_fused_experts(model, state), strict=True)
    return model.to(torch.float32).eval()


def concat_rows(rows: Sequence[PackedBatch]) -> tuple[PackedBatch, list[int]]:
    """Packed rows as one batch of all their samples (in row order), and the token offsets where rows start."""
    from qwenvl.packing import lengths_to_cu_seqlens

    samples = [s for row in rows for s in row.samples]

    def cat(name):
        present = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return torch.cat(present) if present else None

    whole = PackedBatch(
        samples=samples,
        input_ids=torch.cat([r.input_ids for r in rows], dim=1),
        cu_seqlens=lengths_to_cu_seqlens(torch.tensor([len(s) for s in samples])),
        position_ids=torch.cat([r.position_ids for r in rows], dim=-1),
        pixel_values=cat("pixel_values"),
        image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos"),
        video_grid_thw=cat("video_grid_thw"),
    )
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + r.input_ids.shape[1])
    return whole, starts


def _row(batch: PackedBatch, picked: Sequence[int]) -> tuple[PackedBatch, torch.Tensor]:
    """One packed row of the batch's samples ``picked`` (indices, in that order), and the batch's token index of
    each of its tokens."""
    from qwenvl.packing import lengths_to_cu_seqlens

    cu = batch.cu_seqlens.tolist()
    samples = [batch.samples[i] for i in picked]
    index = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in picked])

    def cat(name):
        present = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        return torch.cat(present) if present else None

    row = PackedBatch(
        samples=samples,
        input_ids=batch.input_ids[:, index],
        cu_seqlens=lengths_to_cu_seqlens(torch.tensor([len(s) for s in samples])),
        position_ids=batch.position_ids[:, :, index],
        pixel_values=cat("pixel_values"),
        image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos"),
        video_grid_thw=cat("video_grid_thw"),
    )
    return row, index


def golden_rows(batch: PackedBatch, row_starts: Sequence[int], *, config=None) -> tuple[list[PackedBatch], torch.Tensor]:
    """The packed rows of the golden batch (``batch.rows`` token offsets), each with its own cu_seqlens, and the
    batch's token index of every row token (rows concatenated).

    With ``config``, a row holding images and videos that the installed release cannot run in one forward
    (``qwenvl.verify.batches.split_by_media``: Qwen3-Omni on 4.57) is split as the data pipeline would split it.
    """
    from qwenvl.verify.batches import split_by_media

    cu = batch.cu_seqlens.tolist()
    rows, indices = [], []
    for start, end in zip(row_starts[:-1], row_starts[1:]):
        picked = [i for i, a in enumerate(cu[:-1]) if start <= a < end]
        groups = [picked]
        if config is not None:
            position = {id(batch.samples[i]): i for i in picked}
            groups = [[position[id(s)] for s in group] for group in split_by_media(config, [batch.samples[i] for i in picked])]
        for group in groups:
            row, index = _row(batch, group)
            rows.append(row)
            indices.append(index)
    return rows, torch.cat(indices)


def golden_batch(tensors: dict[str, torch.Tensor]) -> PackedBatch:
    """The packed row stored in the golden tensors, with its samples (for the runs of each sample alone)."""
    cu = tensors["batch.cu_seqlens"].tolist()
    images, videos = tensors["batch.images_per_sample"].tolist(), tensors["batch.videos_per_sample"].tolist()
    image_grid, video_grid = tensors.get("batch.image_grid_thw"), tensors.get("batch.video_grid_thw")
    samples, patch = [], {"image": 0, "video": 0}
    grid_row = {"image": 0, "video": 0}

    def take(kind, grid, pixels, count):
        if not count:
            return None, None
        rows = grid[grid_row[kind] : grid_row[kind] + count]
        n = int(rows.prod(-1).sum())
        chunk = pixels[patch[kind] : patch[kind] + n]
        grid_row[kind] += count
        patch[kind] += n
        return chunk, rows

    for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        pv, ig = take("image", image_grid, tensors.get("batch.pixel_values"), images[i])
        pvv, vg = take("video", video_grid, tensors.get("batch.pixel_values_videos"), videos[i])
        samples.append(
            Sample(
                input_ids=tensors["batch.input_ids"][0, start:end],
                pixel_values=pv,
                image_grid_thw=ig,
                pixel_values_videos=pvv,
                video_grid_thw=vg,
            )
        )
    return PackedBatch(
        samples=samples,
        input_ids=tensors["batch.input_ids"],
        cu_seqlens=tensors["batch.cu_seqlens"],
        position_ids=tensors["batch.position_ids"],
        pixel_values=tensors.get("batch.pixel_values"),
        image_grid_thw=image_grid,
        pixel_values_videos=tensors.get("batch.pixel_values_videos"),
        video_grid_thw=video_grid,
    )


def _cast(value, dtype):
    return None if value is None else value.to(dtype)


def run_unpatched(model, batch: PackedBatch, names: Sequence[str]):
    """Each sample alone through ``model`` (unpatched), with the batch's positions: logits ``(T, V)`` and the
    gradients of ``loss`` for ``names``."""
    from qwenvl.patches import active_patch

    if active_patch() is not None:
        raise RuntimeError("the golden oracle runs the unpatched model: revert the active qwenvl patch first")
    dtype = next(model.parameters()).dtype
    total = batch.input_ids.shape[1]
    weights = loss_weights(total, model.config.text_config.vocab_size)
    model.zero_grad(set_to_none=True)
    logits, cu = [], batch.cu_seqlens.tolist()
    for sample, start, end in zip(batch.samples, cu[:-1], cu[1:]):
        ids = sample.input_ids[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": batch.position_ids[:, :, start:end]}
        for key in ("pixel_values", "pixel_values_videos"):
            value = getattr(sample, key)
            if value is not None:
                inputs[key] = value.to(dtype)
        for key in ("image_grid_thw", "video_grid_thw"):
            value = getattr(sample, key)
            if value is not None:
                inputs[key] = value
        out = model(**inputs, use_cache=False).logits[0]
        (out * weights[start:end].to(out.dtype)).sum().backward()
        logits.append(out.detach())
    return torch.cat(logits), _grads(model, names)


def run_patched(
    model, rows: Sequence[PackedBatch], names: Sequence[str], *, index: torch.Tensor | None = None, backend: str = "sdpa"
):
    """The packed rows through the patched ``model`` (upstream convention), one forward each: logits ``(T, V)``
    in the batch's token order (``index``: the batch position of each row token, rows concatenated; default
    the identity) and the gradients of the loss over all of them."""
    import qwenvl

    dtype = next(model.parameters()).dtype
    total = sum(row.input_ids.shape[1] for row in rows)
    index = torch.arange(total) if index is None else index
    weights = loss_weights(total, model.config.text_config.vocab_size)[index]
    model.zero_grad(set_to_none=True)
    logits, start = [], 0
    with qwenvl.patch(model, backend=backend):
        for row in rows:
            moved = copy.copy(row)
            moved.pixel_values = _cast(row.pixel_values, dtype)
            moved.pixel_values_videos = _cast(row.pixel_values_videos, dtype)
            out = model(**moved.model_inputs("upstream")).logits[0]
            end = start + out.shape[0]
            (out * weights[start:end].to(out.dtype)).sum().backward()
            logits.append(out.detach())
            start = end
    ordered = torch.empty_like(torch.cat(logits))
    ordered[index] = torch.cat(logits)
    return ordered, _grads(model, names)


def _canonical(name: str) -> str:
    """A parameter name without the container prefixes releases rename (4.57's Qwen3-Omni thinker has
    ``model.layers.0...`` where 5.x has ``model.language_model.layers.0...``)."""
    return re.sub(r"^(thinker\.)?(model\.)?(language_model\.)?", "", name)


def _grads(model, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The gradients of ``names`` (the golden names), found under this release's names where containers moved."""
    params = dict(model.named_parameters())
    by_canonical: dict[str, list[str]] = {}
    for name in params:
        by_canonical.setdefault(_canonical(name), []).append(name)
    out = {}
    for name in names:
        param = params.get(name)
        if param is None and len(by_canonical.get(_canonical(name), [])) == 1:
            param = params[by_canonical[_canonical(name)][0]]
        if param is not None:
            out[name] = torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
    return out


def float64_copy(model):
    """``model`` in float64 (transformers 5.x runs MoE experts through grouped_mm, which has no float64 kernel)."""
    ref = copy.deepcopy(model).to(torch.float64)
    if hasattr(ref, "set_experts_implementation"):
        ref.set_experts_implementation("eager")
    return ref


@dataclass
class Comparison:
    """One output against a reference by the rule: the worst logits and gradient errors with their bounds."""

    logits_err: float
    logits_bound: float
    grad_err: float
    grad_bound: float
    worst_grad: str
    passed: bool
    why: str = ""

    @property
    def ratio(self) -> float:
        """The worst error over its bound (<= 1 passes)."""
        ratios = [e / b if b > 0 else (0.0 if e == 0 else float("inf")) for e, b in ((self.logits_err, self.logits_bound), (self.grad_err, self.grad_bound))]
        return max(ratios)


def compare(
    logits: torch.Tensor,
    grads: dict[str, torch.Tensor],
    ref_logits: torch.Tensor,
    ref_grads: dict[str, torch.Tensor],
    pt_logits: torch.Tensor,
    pt_grads: dict[str, torch.Tensor],
) -> Comparison:
    """``qwenvl.tolerances.judge`` on the logits and on each gradient (cpu/float32 k and absolute cap)."""
    tol = tolerance("cpu", torch.float32)
    if logits.shape != ref_logits.shape:
        return Comparison(float("inf"), 0.0, float("inf"), 0.0, "", False, f"logits shape {tuple(logits.shape)} != {tuple(ref_logits.shape)}")
    verdict = judge(logits, ref_logits, pt_logits, k=tol.k_out)
    passed, why = verdict.passed, "" if verdict.passed else "logits"
    largest = verdict.err
    grad_err, grad_bound, worst = 0.0, 0.0, ""
    missing = sorted(set(ref_grads) - set(grads))
    if missing:
        passed, why = False, f"parameters missing on this release: {', '.join(missing[:3])}"
    for name, ref in ref_grads.items():
        if name not in grads:
            continue
        if grads[name].shape != ref.shape:
            passed, why = False, f"{name}: shape {tuple(grads[name].shape)} != {tuple(ref.shape)}"
            continue
        g = judge(grads[name], ref, pt_grads[name], k=tol.k_grad)
        if not g.passed:
            passed, why = False, why or f"gradient of {name}"
        if not worst or g.err - g.bound > grad_err - grad_bound:
            grad_err, grad_bound, worst = g.err, g.bound, name
        largest = max(largest, g.err)
    if tol.model_atol is not None and largest >= tol.model_atol and passed:
        passed, why = False, f"absolute error {largest:.2e} >= model_atol {tol.model_atol:.0e}"
    return Comparison(verdict.err, verdict.bound, grad_err, grad_bound, worst, passed, why)


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


@contextlib.contextmanager
def one_thread():
    """Run on one intra-op thread (restored after): the tiny models gain nothing from more, and on a busy machine
    spinning threads made a family's check 30x slower (measured: 0.9 s against 29 s on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_family(family: str, *, tensors: dict[str, torch.Tensor] | None = None, root: Path | None = None) -> FamilyDrift:
    """The golden check of ``family`` on the installed release (``tensors``: golden tensors to use instead of the
    files, for tests)."""
    with one_thread():
        return _check_family(family, tensors=tensors, root=root)


def _check_family(family: str, *, tensors, root) -> FamilyDrift:
    import transformers

    start = time.perf_counter()
    spec = get_family(family)
    if not spec.available():
        return FamilyDrift(family, SKIPPED, f"transformers {transformers.__version__} has no {family} (from {spec.min_transformers})")
    if tensors is None:
        try:
            manifest = load_manifest(root)
        except FileNotFoundError as exc:
            return FamilyDrift(family, MISSING, str(exc))
        if family not in manifest["families"]:
            return FamilyDrift(family, MISSING, f"no golden tensors for {family}: run scripts/make_golden.py")
        try:
            tensors = load_golden(family, root)
        except (ValueError, FileNotFoundError) as exc:
            return FamilyDrift(family, ERROR, str(exc))
    from qwenvl.verify.batches import mixes_media, release_run

    batch = golden_batch(tensors)
    row_starts = tensors["batch.rows"].tolist() if "batch.rows" in tensors else [0, batch.input_ids.shape[1]]
    # What this release cannot run at all, unpatched (release_run: FamilySpec.release_bugs names the transformers
    # bug): say so. A row mixing images and videos where one forward cannot is split (below), as the data pipeline would.
    limits = release_run(family, videos=batch.video_grid_thw is not None, float64=True).left_out
    if "videos" in limits:
        return FamilyDrift(family, SKIPPED, f"the golden batch cannot run here: {limits['videos']}")
    no_float64 = limits.get("float64")
    ref_grads = {k.removeprefix("grad.ref."): v for k, v in tensors.items() if k.startswith("grad.ref.")}
    pt_grads = {k.removeprefix("grad.pt."): v for k, v in tensors.items() if k.startswith("grad.pt.")}
    names = list(ref_grads)

    model = golden_model(family)
    rows, index = golden_rows(batch, row_starts, config=None if mixes_media(family) else model.config)
    positions_same = _positions_same(model, batch)
    here_ref = None
    if not no_float64:
        here_ref = run_unpatched(float64_copy(model), batch, names)
    logits, grads = run_unpatched(model, batch, names)
    packed_logits, packed_grads = run_patched(model, rows, names, index=index)

    unpatched = compare(logits, grads, tensors["logits.ref"], ref_grads, tensors["logits.pt"], pt_grads)
    patched = compare(packed_logits, packed_grads, tensors["logits.ref"], ref_grads, tensors["logits.pt"], pt_grads)
    here, ref_drift = None, None
    if here_ref is not None:
        here = compare(packed_logits, packed_grads, *here_ref, logits, grads)
        ref_drift = max(_max_diff({"logits": here_ref[0]}, {"logits": tensors["logits.ref"]}), _max_diff(here_ref[1], ref_grads))
    status, reason = classify(unpatched, patched, here, positions_same)
    if no_float64:
        reason = "; ".join(filter(None, [reason, f"patch judged against the golden only ({no_float64})"]))
    if status == TRANSFORMERS_CHANGED and known_drift(family):
        reason = f"{reason}; known: {known_drift(family)}"
    return FamilyDrift(
        family=family,
        status=status,
        reason=reason,
        positions_same=positions_same,
        unpatched=unpatched,
        patched=patched,
        here=here,
        ref_drift=ref_drift,
        seconds=time.perf_counter() - start,
    )


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
