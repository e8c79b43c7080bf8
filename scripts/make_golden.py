"""Write the golden tensors (fixtures/golden/) under the pinned transformers release, and say what moved.

    nox -s golden                      # installs the pinned release (the newest of the matrix) and runs this
    python scripts/make_golden.py      # the same, in an environment that already has it
    python scripts/make_golden.py --check   # rebuild in memory, print what would move, exit 1 if anything would

For every family of ``qwenvl.families.FAMILIES``: the embedded tiny model (fixtures/models/<fixture>/), a packed
row of five samples (images, a video, text, one token), the float64 oracle and the float32 run of each sample
alone (logits and the gradients of the selected parameters), one layer's attention inputs with the reference
attention's output; the layout is in ``qwenvl.verify.golden``. A family whose patched packed row is not exact
against the oracle under the pinned release is refused: goldens record a correct state, never a bug.

The summary compares the new tensors with the ones on disk, per family: whether the batch changed, and the largest
change of the oracle's logits and gradients and of the attention inputs ("same": bit for bit; "~0": below rounding,
see ``ROUNDING``, which neither counts as moved nor fails ``--check``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "fixtures" / "golden"


def pinned_versions() -> tuple[str, str]:
    """(transformers, torch) the goldens are written under: the newest release of the matrix, the CPU torch pin."""
    from qwenvl.patches._versions import TESTED_VERSIONS

    # [tool.qwenvl] torch-cpu, read without tomllib (Python 3.10 has none).
    text = (ROOT / "pyproject.toml").read_text()
    return TESTED_VERSIONS[-1], re.search(r'torch-cpu\s*=\s*"([^"]+)"', text).group(1)


class NotExact(RuntimeError):
    """The patch is not exact on a family under the pinned release: its goldens are not written."""


@contextlib.contextmanager
def record_attention():
    """Every call of the varlen core while patched: ``(q, k, v, meta, options)`` (detached copies)."""
    from qwenvl.patches import _dispatch

    calls = []
    original = _dispatch.varlen_attention

    def recording(q, k, v, meta, **options):
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), meta, dict(options)))
        return original(q, k, v, meta, **options)

    _dispatch.varlen_attention = recording
    try:
        yield calls
    finally:
        _dispatch.varlen_attention = original


def attention_tensors(prefix: str, call) -> dict:
    import math

    import torch

    from qwenvl.reference import attention_ref, mask_from_cu_seqlens

    q, k, v, meta, options = call
    scale = options.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    window = tuple(int(w) for w in options.get("window", (-1, -1)))
    causal = bool(options.get("causal", True))
    mask = mask_from_cu_seqlens(meta.cu_seqlens, causal=causal, window=window)
    return {
        f"{prefix}.q": q.float().contiguous(),
        f"{prefix}.k": k.float().contiguous(),
        f"{prefix}.v": v.float().contiguous(),
        f"{prefix}.cu_seqlens": meta.cu_seqlens.to(torch.int32).contiguous(),
        f"{prefix}.window": torch.tensor(window, dtype=torch.int64),
        f"{prefix}.causal": torch.tensor([int(causal)], dtype=torch.int64),
        f"{prefix}.scale": torch.tensor([scale], dtype=torch.float64),
        f"{prefix}.out_ref": attention_ref(q.double(), k.double(), v.double(), mask, scale=scale).contiguous(),
        f"{prefix}.out_pt": attention_ref(q.float(), k.float(), v.float(), mask, upcast=False, scale=scale).contiguous(),
    }


def build_family(family: str) -> tuple[dict, dict]:
    """The golden tensors of ``family`` and its manifest facts."""
    import torch

    from qwenvl.verify import golden
    from qwenvl.verify.batches import make_sample, pack, split_by_media

    model = golden.golden_model(family)
    gen = torch.Generator().manual_seed(golden.GOLDEN_SEED)
    samples = [make_sample(model.config, spec, generator=gen) for spec in golden.GOLDEN_SPECS]
    # One row, or (GLM-4V: one placeholder for images and videos) the rows one forward can take.
    rows = [pack(model, row) for row in split_by_media(model.config, samples)]
    batch, row_starts = golden.concat_rows(rows)
    samples = batch.samples
    names = golden.selected_parameters(model)

    weights = golden.loss_weights(batch.input_ids.shape[1], model.config.text_config.vocab_size)
    ref_logits, ref_grads = golden.run_alone(golden.float64_copy(model), [batch], weights, names=names)
    pt_logits, pt_grads = golden.run_alone(model, [batch], weights, names=names)
    with record_attention() as calls:
        packed_logits, packed_grads = golden.run_packed(model, rows, weights, names=names, backend="sdpa")
    verdict = golden.compare(packed_logits, packed_grads, ref_logits, ref_grads, pt_logits, pt_grads)
    if not verdict.passed:
        raise NotExact(f"the patched packed row is not exact under this release ({verdict.why})")
    text = next(c for c in calls if c[4].get("causal", True))
    vision = next((c for c in calls if not c[4].get("causal", True)), None)

    def count(attr):
        return torch.tensor([0 if getattr(s, attr) is None else len(getattr(s, attr)) for s in samples], dtype=torch.int64)

    tensors = {
        "batch.input_ids": batch.input_ids,
        "batch.cu_seqlens": batch.cu_seqlens,
        "batch.position_ids": batch.position_ids,
        "batch.images_per_sample": count("image_grid_thw"),
        "batch.videos_per_sample": count("video_grid_thw"),
        "batch.rows": torch.tensor(row_starts, dtype=torch.int64),
        **{f"batch.{k}": v for k, v in batch.vision_inputs().items()},
        "logits.ref": ref_logits,
        "logits.pt": pt_logits,
        **{f"grad.ref.{k}": v for k, v in ref_grads.items()},
        **{f"grad.pt.{k}": v for k, v in pt_grads.items()},
        **attention_tensors("attn.text", text),
        **(attention_tensors("attn.vision", vision) if vision is not None else {}),
    }
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    facts = {
        "tokens": int(batch.input_ids.shape[1]),
        "samples": len(samples),
        "rows": len(rows),
        "vocab": int(model.config.text_config.vocab_size),
        "grads": names,
        "parity_at_generation": {"logits_err": verdict.logits_err, "grad_err": verdict.grad_err, "worst_grad": verdict.worst_grad},
    }
    return tensors, facts


# Below these a change is rounding (thread counts, kernel choice), reported as "~0" and not counted as moved: the
# float64 oracle at fp64 resolution, the float32 attention inputs at fp32 resolution of values of order 1-10.
ROUNDING = {"batch": 0.0, "logits.ref": 1e-12, "grad.ref": 1e-12, "attn": 1e-5}


def _moved(new: dict, old: dict | None) -> dict:
    """How far the new tensors are from the ones on disk, by group."""
    if old is None:
        return {"new": True}
    out = {}
    for group in ("batch", "logits.ref", "grad.ref", "attn"):
        keys = [k for k in new if k.startswith(group)]
        gone = [k for k in old if k.startswith(group) and k not in new]
        diffs = []
        for key in keys:
            if key not in old or old[key].shape != new[key].shape or old[key].dtype != new[key].dtype:
                diffs.append(float("inf"))
            else:
                diffs.append((new[key].double() - old[key].double()).abs().max().item() if new[key].numel() else 0.0)
        out[group] = float("inf") if gone else max(diffs, default=0.0)
    return out


def _fmt(value, group: str) -> str:
    if value == 0:
        return "same"
    if value <= ROUNDING[group]:
        return "~0"
    return "changed" if value == float("inf") else f"{value:.1e}"


def _has_moved(moved: dict) -> bool:
    return bool(moved.get("new")) or any(moved[g] > ROUNDING[g] for g in ROUNDING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any golden tensor would move")
    parser.add_argument("--family", action="append", help="only these families (default: every family of FAMILIES)")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from qwenvl.families import FAMILIES
    from qwenvl.fixtures import model_dir
    from qwenvl.tolerances import TOLERANCES
    from qwenvl.verify import golden

    want_tf, want_torch = pinned_versions()
    have_torch = torch.__version__.split("+")[0]
    if transformers.__version__ != want_tf or have_torch != want_torch:
        parser.error(
            f"goldens are written under transformers {want_tf} and torch {want_torch} (the newest release of the "
            f"matrix, the CPU pin); found transformers {transformers.__version__}, torch {torch.__version__}: run `nox -s golden`"
        )
    families = args.family or [name for name, spec in FAMILIES.items() if spec.available()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")

    manifest_path = GOLDEN / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    # With --family, the other families' entries stay as they are.
    entries = dict(manifest.get("families", {})) if args.family else {}
    rows, moved_any = [], False
    GOLDEN.mkdir(parents=True, exist_ok=True)
    without_model, refused = [], []
    for family in families:
        spec = FAMILIES[family]
        try:
            model_dir(family)
        except FileNotFoundError as exc:
            without_model.append(family)
            print(f"{family}: skipped, {exc}", flush=True)
            continue
        try:
            with golden.one_thread():
                tensors, facts = build_family(family)
        except NotExact as exc:
            refused.append(family)
            print(f"{family}: refused, {exc}", flush=True)
            continue
        path = GOLDEN / f"{spec.fixture}.safetensors"
        old = load_file(path) if path.is_file() else None
        moved = _moved(tensors, old)
        moved_any = moved_any or _has_moved(moved)
        if not args.check:
            save_file(tensors, path, metadata={"family": family, "transformers": transformers.__version__})
            path.chmod(0o644)  # safetensors writes 0600; the file is a tracked fixture
        models = Path("..") / "models" / spec.fixture
        files = {path.name: golden.sha256(path) if path.is_file() else ""}
        for name in ("model.safetensors", "config.json"):
            rel = models / name
            files[str(rel)] = golden.sha256(GOLDEN / rel)
        entries[family] = {"tensors": path.name, "files": files, **facts}
        size = path.stat().st_size if path.is_file() else 0
        rows.append((family, facts["tokens"], size, moved))
        print(f"{family}: {facts['tokens']} tokens, parity at generation {facts['parity_at_generation']['logits_err']:.1e}", flush=True)

    tol = TOLERANCES["cpu", torch.float32]
    manifest = {
        "generator": "scripts/make_golden.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": "cpu",
        "dtype": "float32",
        "reference_dtype": "float64",
        "tolerance": {
            "rule": "max|out - ref| <= k * max|pt - ref| + floor, floor = 2 * max|((ref.to(float32) + 0.3) - 0.3) - ref| "
            "(qwenvl.tolerances.judge); and max|out - ref| < model_atol",
            "k_out": tol.k_out,
            "k_grad": tol.k_grad,
            "model_atol": tol.model_atol,
        },
        "batch": [{"text": s.text, "image": s.image, "video": s.video} for s in golden.GOLDEN_SPECS],
        "batch_seed": golden.GOLDEN_SEED,
        "loss": "sum(logits * W), W[t, v] = cos(0.7 t + 1.3 v) / T",
        "grad_patterns": list(golden.GRAD_PATTERNS),
        "families": dict(sorted(entries.items(), key=lambda kv: list(FAMILIES).index(kv[0]) if kv[0] in FAMILIES else 99)),
    }
    if not args.check:
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    print()
    width = max([len("family"), *(len(row[0]) for row in rows)])
    print(f"{'family':<{width}} {'tokens':>6} {'KiB':>7}  {'batch':>8} {'logits.ref':>10} {'grad.ref':>9} {'attn':>8}")
    for family, tokens, size, moved in rows:
        if moved.get("new"):
            cells = ["new"] * 4
        else:
            cells = [_fmt(moved[g], g) for g in ("batch", "logits.ref", "grad.ref", "attn")]
        print(f"{family:<{width}} {tokens:>6} {size / 1024:>7.1f}  {cells[0]:>8} {cells[1]:>10} {cells[2]:>9} {cells[3]:>8}")
    total = sum(p.stat().st_size for p in GOLDEN.glob("*") if p.is_file())
    fixtures = sum(p.stat().st_size for p in (ROOT / "fixtures").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    verb = "would move" if args.check else "moved"
    count = sum(1 for *_, m in rows if _has_moved(m))
    print(
        f"{count} of {len(rows)} families {verb}; fixtures/golden {total / 2**20:.2f} MiB, fixtures/ {fixtures / 2**20:.2f} MiB "
        f"(transformers {transformers.__version__}, torch {torch.__version__})"
    )
    if without_model:
        print(f"no goldens for {', '.join(without_model)}: write their tiny models first (scripts/make_fixtures.py)", file=sys.stderr)
    if refused:
        print(f"no goldens for {', '.join(refused)}: the patch is not exact there (a golden records a correct state)", file=sys.stderr)
    return 1 if (args.check and moved_any) or without_model or refused else 0


if __name__ == "__main__":
    sys.exit(main())
