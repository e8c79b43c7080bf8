"""The golden tensors (fixtures/golden/, ``qwenvl.verify.golden``): complete, intact, small, and the installed
release computes what the pinned one recorded, unpatched and patched.

A family the installed release lacks is skipped (conftest, by ``spec.available()``). Drift of transformers that a
person has explained is listed in ``qwenvl.verify.golden.KNOWN_DRIFT``; any other drift fails here, so that a new
release's change is looked at before it is accepted (then: explain it there, or regenerate with ``nox -s golden``
when the pinned release moves).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from qwenvl.families import FAMILIES
from qwenvl.fixtures import FAMILY_NAMES
from qwenvl.tolerances import tolerance
from qwenvl.verify import golden

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = golden.load_manifest()


def test_every_family_of_the_pinned_release_has_goldens():
    pinned = MANIFEST["transformers"]
    wanted = [name for name, spec in FAMILIES.items() if spec.available(pinned)]
    missing = sorted(set(wanted) - set(MANIFEST["families"]))
    assert not missing, f"no golden tensors for {missing}: run `nox -s golden` (scripts/make_golden.py)"
    assert set(MANIFEST["families"]) <= set(FAMILIES)


def test_manifest_records_the_pinned_versions_and_the_rule():
    from qwenvl.patches._versions import TESTED_VERSIONS

    torch_cpu = re.search(r'torch-cpu\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert MANIFEST["transformers"] == TESTED_VERSIONS[-1]  # the newest release of the matrix
    assert MANIFEST["torch"].split("+")[0] == torch_cpu
    assert (MANIFEST["device"], MANIFEST["dtype"], MANIFEST["reference_dtype"]) == ("cpu", "float32", "float64")
    tol = tolerance("cpu", torch.float32)
    recorded = MANIFEST["tolerance"]
    assert (recorded["k_out"], recorded["k_grad"], recorded["model_atol"]) == (tol.k_out, tol.k_grad, tol.model_atol), (
        "qwenvl.tolerances changed since the goldens were written: regenerate them (nox -s golden)"
    )


@pytest.mark.parametrize("family", sorted(MANIFEST["families"]))
def test_every_golden_file_matches_its_sha256(family):
    entry = MANIFEST["families"][family]
    assert golden._check_files(entry, golden.golden_dir()) is None
    tensors = golden.load_golden(family)
    assert tensors["logits.ref"].dtype == torch.float64 and tensors["logits.pt"].dtype == torch.float32
    assert tensors["logits.ref"].shape == (entry["tokens"], entry["vocab"])
    assert sorted(k.removeprefix("grad.ref.") for k in tensors if k.startswith("grad.ref.")) == sorted(entry["grads"])


@pytest.mark.parametrize("family", sorted(MANIFEST["families"]))
def test_the_recorded_gradients_are_the_selection_derived_from_the_spec(family):
    """``make_golden`` records ``selected_parameters``: the patterns with the family's own deepstack list
    (``FamilySpec.deepstack_mergers``), less what ``RECORDED_WITHOUT_DEEPSTACK`` says its goldens lack."""
    if transformers.__version__ != MANIFEST["transformers"]:
        pytest.skip(f"parameter names are those of the pinned release {MANIFEST['transformers']}")
    assert golden.selected_parameters(golden.golden_model(family)) == MANIFEST["families"][family]["grads"]


@pytest.mark.parametrize("family", sorted(golden.RECORDED_WITHOUT_DEEPSTACK))
def test_goldens_recorded_without_their_deepstack_mergers_still_lack_them(family):
    """The exception is live: the golden lacks the deepstack mergers that the spec-derived selection has (drop the
    family from ``RECORDED_WITHOUT_DEEPSTACK`` when re-recording it)."""
    spec = FAMILIES[family]
    assert spec.deepstack_mergers is not None
    deepstack = re.compile(rf"\.{re.escape(spec.deepstack_mergers)}\.\d+\.")
    assert not [name for name in MANIFEST["families"][family]["grads"] if deepstack.search(name)]
    patterns = [re.compile(p) for p in golden.grad_patterns(spec)]
    derived = [name for name, _ in golden.golden_model(family).named_parameters() if any(p.search(name) for p in patterns)]
    assert [name for name in derived if deepstack.search(name)], f"{family}'s spec-derived selection has no deepstack merger"


def test_the_batch_holds_images_a_video_and_text_only_samples():
    tensors = golden.load_golden("qwen2_vl")
    images, videos = tensors["batch.images_per_sample"], tensors["batch.videos_per_sample"]
    assert int(images.sum()) >= 2 and int(videos.sum()) >= 1
    assert int(((images == 0) & (videos == 0)).sum()) >= 2
    lengths = tensors["batch.cu_seqlens"].diff()
    assert int(lengths.min()) == 1


@pytest.mark.parametrize("family", sorted(MANIFEST["families"]))
def test_the_training_collator_rebuilds_the_recorded_rows(family):
    """The golden rows are the collator's: its samples, read back, collate into exactly the stored batch, and the
    rows one forward each takes are its own collated rows of those samples (no second row builder)."""
    from qwenvl.data import PackedCollator

    tensors = golden.load_golden(family)
    batch = golden.golden_batch(tensors)
    for name in ("input_ids", "cu_seqlens", "position_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        stored = tensors.get(f"batch.{name}")
        assert (getattr(batch, name) is None) == (stored is None), name
        assert stored is None or torch.equal(getattr(batch, name), stored), name
    rows, index = golden.golden_rows(batch, tensors["batch.rows"].tolist())
    for row in rows:
        collated = PackedCollator("upstream")(row.items)
        assert torch.equal(row.input_ids, collated["input_ids"]) and torch.equal(row.cu_seqlens, collated["attention_mask"])
    assert torch.equal(torch.cat([row.input_ids[0] for row in rows]), batch.input_ids[0, index])


def test_the_fixture_set_stays_small():
    golden_bytes = sum(p.stat().st_size for p in golden.golden_dir().iterdir() if p.is_file())
    fixture_bytes = sum(p.stat().st_size for p in (ROOT / "fixtures").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert golden_bytes < 800 * 1024 * max(1, len(MANIFEST["families"]))
    assert fixture_bytes < 20 * 2**20, f"fixtures/ is {fixture_bytes / 2**20:.1f} MiB"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_installed_release_matches_the_goldens(family):
    result = golden.check_family(family)
    if result.status == golden.SKIPPED:  # the release cannot run the batch at all (a named upstream bug)
        pytest.skip(result.reason)
    expected = golden.TRANSFORMERS_CHANGED if golden.known_drift(family) else golden.EXACT
    detail = {k: getattr(result, k) for k in ("status", "reason", "positions_same", "ref_drift")}
    assert result.status == expected, f"transformers {transformers.__version__}, {family}: {detail}"
    # Numbers, not only a verdict: every comparison's error and bound are finite.
    for comparison in (result.unpatched, result.patched, result.here):
        if comparison is not None:  # `here` is None where the release has no float64 run (FamilySpec.release_bugs)
            assert 0 <= comparison.logits_err <= 1 and comparison.logits_bound > 0


def test_a_change_of_the_model_maths_is_told_apart_from_our_patch():
    tensors = golden.load_golden("qwen2_vl")
    moved = dict(tensors)
    # As if a release changed the model: the recorded outputs (oracle and yardstick alike) are another model's,
    # 10x fp32 rounding away.
    moved["logits.ref"] = tensors["logits.ref"] + 1e-5
    moved["logits.pt"] = tensors["logits.pt"] + 1e-5
    result = golden.check_family("qwen2_vl", tensors=moved)
    assert result.status == golden.TRANSFORMERS_CHANGED and not result.failed
    assert result.unpatched.ratio > 1 and result.here.ratio <= 1 and "unpatched model vs golden" in result.reason


def test_a_broken_patch_is_ours(monkeypatch):
    from qwenvl.patches import _dispatch

    real = _dispatch.varlen_attention

    def non_causal(*args, **kwargs):
        return real(*args, **{**kwargs, "causal": False})

    monkeypatch.setattr(_dispatch, "varlen_attention", non_causal)
    result = golden.check_family("qwen2_vl")
    assert result.status == golden.PATCH_DIFFERS and result.failed
    assert result.unpatched.passed and not result.here.passed and not result.patched.passed


def test_a_corrupted_file_is_named(tmp_path):
    import json
    import shutil

    root = tmp_path / "golden"
    shutil.copytree(golden.golden_dir(), root)
    (tmp_path / "models").symlink_to(golden.golden_dir().parent / "models")
    manifest = json.loads((root / "manifest.json").read_text())
    name = manifest["families"]["qwen2_vl"]["tensors"]
    data = bytearray((root / name).read_bytes())
    data[-1] ^= 1
    (root / name).write_bytes(bytes(data))
    result = golden.check_family("qwen2_vl", root=root)
    assert result.status == golden.ERROR and result.failed
    assert f"{name} does not match its sha256" in result.reason


# ---------------------------------------------------------------------------------------------------------
# The report of `qwenvl verify`: the golden section, JSON and Markdown, the last line.


@pytest.fixture
def fake_cases(monkeypatch):
    """``run_case`` replaced by a passing row (a real case takes seconds; the golden section runs for real)."""
    from types import SimpleNamespace

    import qwenvl.verify.parity as parity

    def run_case(family, *, backend, device, dtype, convention):
        row = dict(
            family=family, backend=backend, device=device, dtype=str(dtype).removeprefix("torch."), convention=convention,
            tokens=1, samples=1, logits_err=0.0, logits_bound=1.0, grad_err=0.0, grad_bound=1.0, worst_grad="", passed=True,
        )
        return SimpleNamespace(as_dict=lambda: dict(row))

    monkeypatch.setattr(parity, "run_case", run_case)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_verify_reports_golden_coverage_and_a_last_line(fake_cases, tmp_path, capsys):
    import json

    from qwenvl import cli

    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["verify", "--family", "qwen2_vl", "--packing_convention", "upstream", "--json", str(out), "--markdown", str(md)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads(out.read_text())
    version = transformers.__version__
    assert report["summary"] == printed[-1]
    assert printed[-1].startswith(f"transformers {version}: 1/1 families exact, 0 drift;")
    (family,) = report["golden"]["families"]
    assert family["family"] == "qwen2_vl" and family["status"] == golden.EXACT and family["unpatched"]["ratio"] < 1
    assert any(line.startswith("[golden] qwen2_vl: exact") for line in printed)
    coverage = {(row["device"], row["backend"]): row for row in report["coverage"]}
    assert coverage["cpu", "sdpa"]["cases"] == 1 and coverage["cuda", "*"]["reason"]
    text = md.read_text()
    for heading in ("## Backend and device coverage", "## Golden drift", "## Parity cases"):
        assert heading in text
    assert f"**{printed[-1]}**" in text and "| qwen2_vl | exact | same |" in text


def test_verify_fails_when_our_patch_differs_from_the_goldens(fake_cases, tmp_path, monkeypatch, capsys):
    from qwenvl import cli
    from qwenvl.patches import _dispatch

    real = _dispatch.varlen_attention
    monkeypatch.setattr(_dispatch, "varlen_attention", lambda *a, **k: real(*a, **{**k, "causal": False}))
    argv = ["verify", "--family", "qwen2_vl", "--backend", "sdpa", "--packing_convention", "upstream", "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert "0/1 families exact" in last and "do not train packed" in last and "qwen2_vl" in last


def test_bad_markdown_path_is_one_line_before_any_case(fake_cases, tmp_path, capsys):
    from qwenvl import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verify", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "missing" / "r.md")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument --markdown: directory {tmp_path / 'missing'} does not exist" in err


def test_last_line_names_drift_and_absent_families():
    from qwenvl.verify.report import last_line

    def fam(name, status, reason=""):
        return {"family": name, "status": status, "reason": reason}

    report = {
        "transformers": "4.57.6",
        "cases": [{"family": f, "passed": True} for f in ("qwen2_vl", "qwen2_5_vl")],
        "skipped": [{"family": "qwen3_5", "reason": "absent"}],
        "golden": {"families": [fam("qwen2_vl", golden.EXACT), fam("qwen2_5_vl", golden.TRANSFORMERS_CHANGED, "x; known: y")]},
    }
    line = last_line(report)
    assert line.startswith("transformers 4.57.6: 1/2 families exact, 1 drift (qwen2_5_vl (known)), 1 not in this release;")
    assert "safe to train packed" in line and "2/2 cases passed" in line
    # A family run with a release's limit is no absent family; the line names the limit.
    report["skipped"].append({"family": "qwen2_vl", "limit": "videos left out", "reason": "bug"})
    line = last_line(report)
    assert line.startswith("transformers 4.57.6: 1/2 families exact, 1 drift (qwen2_5_vl (known)), 1 not in this release;")
    assert "(transformers bugs limit qwen2_vl: videos left out)" in line
