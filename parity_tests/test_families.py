"""One family registry: every spec has its fixture, every fixture its spec, and everything else follows ``FAMILIES``.

A family added to ``qwenvl.families.FAMILIES`` reaches the fixtures, ``qwenvl verify``, the sample builders and
every test parametrised over the families; these tests fail when a piece it needs is missing instead of the
family silently dropping out.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from importlib import resources

import pytest
import torch
import transformers

import qwenvl.fixtures as fixtures
from qwenvl.families import FAMILIES, FamilySpec, SpecialTokens, available_families
from qwenvl.positions import mm_token_type_ids
from qwenvl.verify.batches import SampleSpec, make_sample, mixes_media, pack, split_by_media

FAMILY_NAMES = list(FAMILIES)
SHARED_PLACEHOLDER = [name for name, spec in FAMILIES.items() if spec.tokens.shared_placeholder]


def _visual(model):
    """The vision tower, wherever the release keeps it (``model.model.visual``; Qwen3-Omni's thinker before 5.x's
    refactor: ``model.visual``)."""
    return next(module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == "visual")


def _routed_experts(text_config) -> int | None:
    # Qwen: num_experts; GLM-4V-MoE (DeepSeek-style): n_routed_experts.
    return getattr(text_config, "num_experts", None) or getattr(text_config, "n_routed_experts", None)


def _fixture_configs() -> set[str]:
    configs = resources.files(fixtures.__name__).joinpath("configs")
    return {entry.name.removesuffix(".json") for entry in configs.iterdir() if entry.name.endswith(".json")}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_spec_has_its_fixture_config(family):
    path = fixtures.config_path(family)
    assert path.is_file(), f"family {family!r} has no fixture: add fixtures/configs/{FAMILIES[family].fixture}.json"
    assert isinstance(json.loads(path.read_text()), dict)


def test_every_fixture_config_has_a_spec():
    orphans = _fixture_configs() - {spec.fixture for spec in FAMILIES.values()}
    assert not orphans, f"fixture configs without a FamilySpec in qwenvl/families.py: {sorted(orphans)}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_spec_names_exist_in_the_installed_transformers(family):
    spec = FAMILIES[family]
    module = importlib.import_module(spec.module)
    missing = [name for name in (spec.config_class, *spec.entry_classes) if not hasattr(transformers, name)]
    names = (*spec.entry_classes, spec.text_attention, spec.vision_attention, *spec.mask_builders)
    missing += [f"{spec.module}.{name}" for name in names if not hasattr(module, name)]
    if spec.aux_loss and not hasattr(module, spec.aux_loss):
        # Allowed only where no entry class computes a router loss (GLM-4V-MoE on 4.57): nothing to patch there.
        sources = [inspect.getsource(getattr(module, name)) for name in spec.entry_classes if hasattr(module, name)]
        if any(spec.aux_loss in source for source in sources):
            missing.append(f"{spec.module}.{spec.aux_loss}")
    assert not missing, f"transformers {transformers.__version__} has no {', '.join(missing)}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fixture_matches_its_spec(family):
    spec = FAMILIES[family]
    model = fixtures.tiny_model(family)
    config = model.config
    assert type(config).__name__ == spec.config_class and config.model_type == spec.name
    assert type(model).__name__ == spec.entry_classes[0]
    assert getattr(config.vision_config, spec.merger_width_key) == config.text_config.hidden_size
    visual = _visual(model)
    assert hasattr(visual, spec.deepstack_mergers or "deepstack_merger_list") == (spec.deepstack_mergers is not None)
    assert (_routed_experts(config.text_config) is not None) == (spec.aux_loss is not None)
    for key in spec.tokens.keys():
        assert isinstance(getattr(config, key), int), f"{spec.config_class} has no {key}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merger_width_key_is_the_one_the_model_reads(family):
    # A wider text model (same head_dim, so mrope_section still fits) needs a wider merger output.
    model = fixtures.tiny_model(family, hidden_size=128, num_attention_heads=8)
    last = [m for m in _visual(model).merger.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == 128 == model.config.text_config.hidden_size


def test_fixture_family_names_derive_from_the_registry():
    assert fixtures.FAMILY_NAMES == tuple(FAMILIES)


def test_default_verify_cases_cover_every_family(tmp_path, monkeypatch):
    import qwenvl.verify.parity as parity
    from qwenvl import cli

    seen = []

    def record(family, *, backend, device, dtype, convention, **kwargs):
        seen.append(family)
        return parity.CaseResult(family, backend, device, str(dtype), convention, 1, 1, 0.0, 0.0, 0.0, 0.0, "", True)

    monkeypatch.setattr(parity, "run_case", record)
    out = tmp_path / "report.json"
    assert cli.main(["verify", "--backend", "sdpa", "--device", "cpu", "--packing_convention", "upstream", "--json", str(out)]) == 0
    # Every family either runs or is skipped with its reason (not in this release; no float64 oracle on this device).
    # A family run with a limit that leaves it running (videos left out) is named too, and runs.
    entries = [entry for entry in json.loads(out.read_text())["skipped"] if "family" in entry]
    skipped = {entry["family"]: entry["reason"] for entry in entries if "limit" not in entry or "device" in entry}
    assert seen == [family for family in FAMILY_NAMES if family not in skipped]
    assert set(skipped) <= set(FAMILY_NAMES) - set(seen) and all(skipped.values())
    assert set(available_families()) - set(skipped) == set(seen)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("group_spans", [False, True])
def test_sample_layout_follows_the_spec(family, group_spans, monkeypatch):
    # The batch builder reads the layout from the spec, not from the family's name: flip the field, the layout follows.
    monkeypatch.setitem(FAMILIES, family, dataclasses.replace(FAMILIES[family], video_group_spans=group_spans))
    config = fixtures.tiny_config(family)
    keys = FAMILIES[family].tokens
    sample = make_sample(config, SampleSpec(text=4, video=(3, 2, 4)), generator=torch.Generator().manual_seed(0))
    ids = sample.input_ids
    assert int((ids == getattr(config, keys.start)).sum()) == (3 if group_spans else 1)
    assert int((ids == getattr(config, keys.video)).sum()) == 3 * 2 * 4 // config.vision_config.spatial_merge_size**2
    if keys.video_start is not None:  # GLM-4V: one wrapper around the whole video, outside its spans
        ids = ids.tolist()
        opens, closes = getattr(config, keys.video_start), getattr(config, keys.video_end)
        assert ids.count(opens) == ids.count(closes) == 1
        spans = [i for i, t in enumerate(ids) if t in (getattr(config, keys.start), getattr(config, keys.end))]
        assert ids.index(opens) < min(spans) and max(spans) < ids.index(closes)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_token_type_ids_tell_images_from_videos(family):
    # What the 5.3+ processors return beside input_ids: GLM-4V's images and video frames share a placeholder, so
    # only the <begin_of_video> ... <end_of_video> wrapper makes its frames video tokens (2).
    config = fixtures.tiny_config(family)
    gen = torch.Generator().manual_seed(1)
    specs = [SampleSpec(3, image=(2, 4)), SampleSpec(2, video=(2, 2, 2)), SampleSpec(4, image=(2, 2))]
    ids = torch.cat([make_sample(config, s, generator=gen).input_ids for s in specs])
    types = mm_token_type_ids(config, ids[None])[0].tolist()
    merge = config.vision_config.spatial_merge_size**2
    assert types.count(1) == (2 * 4 + 2 * 2) // merge and types.count(2) == 2 * 2 * 2 // merge
    image_spans = [i for i, t in enumerate(types) if t == 1]
    video_span = [i for i, t in enumerate(types) if t == 2]
    assert max(image_spans[: 2 * 4 // merge]) < min(video_span) and max(video_span) < min(image_spans[2 * 4 // merge :])


@pytest.mark.parametrize("family", SHARED_PLACEHOLDER)
def test_shared_placeholder_families_never_mix_images_and_videos_in_one_forward(family):
    # transformers counts every shared placeholder as an image feature and as a video feature: a forward holding
    # both kinds fails, packed or not. A sample with both is refused; a batch of samples goes into rows by kind.
    model = fixtures.tiny_model(family)
    gen = torch.Generator().manual_seed(2)
    assert not mixes_media(family)
    with pytest.raises(ValueError, match="one placeholder"):
        make_sample(model.config, SampleSpec(4, image=(2, 2), video=(2, 2, 2)), generator=gen)
    samples = [make_sample(model.config, s, generator=gen) for s in (SampleSpec(4, image=(2, 2)), SampleSpec(3), SampleSpec(2, video=(2, 2, 2)))]
    with pytest.raises(ValueError, match="separate rows"):
        pack(model, samples)
    rows = split_by_media(model.config, samples)
    assert rows == [[samples[0]], [samples[1], samples[2]]]
    assert split_by_media(model.config, samples[:2]) == [samples[:2]]  # one kind: one row


def test_spec_defaults_describe_a_plain_family():
    spec = FamilySpec(
        name="new_vl",
        module="m",
        config_class="C",
        entry_classes=("E",),
        text_attention="T",
        vision_attention="V",
        mask_builders=("create_causal_mask",),
    )
    assert spec.fixture == "new_vl"
    assert (spec.aux_loss, spec.deepstack_mergers, spec.video_group_spans) == (None, None, False)
    assert spec.tokens == SpecialTokens() and not spec.tokens.shared_placeholder
    assert spec.release_bugs == () and spec.mixes_media() and spec.release_bug("videos") is None
    assert spec.tokens.keys() == ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    assert dataclasses.replace(spec, fixture="other").fixture == "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]


RELEASE_BUG_KINDS = {"mixed", "videos", "float64", "four_rows", "unmasked", "router_logits", "autocast"}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_release_bugs_are_well_formed(family):
    # Each names what cannot run, on which releases (since < until, from the family's first release on), and why.
    from packaging.version import Version

    spec = FAMILIES[family]
    for bug in spec.release_bugs:
        assert bug.what in RELEASE_BUG_KINDS, bug
        assert Version(spec.min_transformers) <= Version(bug.since) < Version(bug.until), bug
        assert bug.applies(bug.since) and not bug.applies(bug.until)
        assert spec.release_bug(bug.what, bug.since).endswith(bug.bug) and len(bug.bug) > 40
    assert spec.mixes_media("5.24.0") == (not spec.tokens.shared_placeholder)
