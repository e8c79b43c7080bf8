"""One family registry: every spec has its fixture, every fixture its spec, and everything else follows ``FAMILIES``.

A family added to ``qwenvl.families.FAMILIES`` reaches the fixtures, ``qwenvl verify``, the sample builders and
every test parametrised over the families; these tests fail when a piece it needs is missing instead of the
family silently dropping out.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from importlib import resources

import pytest
import torch
import transformers

import qwenvl.fixtures as fixtures
from qwenvl.families import FAMILIES, FamilySpec
from qwenvl.verify.batches import SampleSpec, make_sample

FAMILY_NAMES = list(FAMILIES)


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
    missing += [f"{spec.module}.{name}" for name in (*names, spec.aux_loss) if name and not hasattr(module, name)]
    assert not missing, f"transformers {transformers.__version__} has no {', '.join(missing)}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fixture_matches_its_spec(family):
    spec = FAMILIES[family]
    model = fixtures.tiny_model(family)
    config = model.config
    assert type(config).__name__ == spec.config_class and config.model_type == spec.name
    assert type(model).__name__ == spec.entry_classes[0]
    assert getattr(config.vision_config, spec.merger_width_key) == config.text_config.hidden_size
    visual = model.model.visual
    assert hasattr(visual, spec.deepstack_mergers or "deepstack_merger_list") == (spec.deepstack_mergers is not None)
    assert (getattr(config.text_config, "num_experts", None) is not None) == (spec.aux_loss is not None)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merger_width_key_is_the_one_the_model_reads(family):
    # A wider text model (same head_dim, so mrope_section still fits) needs a wider merger output.
    model = fixtures.tiny_model(family, hidden_size=128, num_attention_heads=8)
    last = [m for m in model.model.visual.merger.modules() if isinstance(m, torch.nn.Linear)][-1]
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
    assert cli.main(["verify", "--backend", "sdpa", "--device", "cpu", "--convention", "upstream", "--json", str(out)]) == 0
    assert seen == FAMILY_NAMES


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("group_spans", [False, True])
def test_sample_layout_follows_the_spec(family, group_spans, monkeypatch):
    # The batch builder reads the layout from the spec, not from the family's name: flip the field, the layout follows.
    monkeypatch.setitem(FAMILIES, family, dataclasses.replace(FAMILIES[family], video_group_spans=group_spans))
    config = fixtures.tiny_config(family)
    sample = make_sample(config, SampleSpec(text=4, video=(3, 2, 4)), generator=torch.Generator().manual_seed(0))
    ids = sample.input_ids
    assert int((ids == config.vision_start_token_id).sum()) == (3 if group_spans else 1)
    assert int((ids == config.video_token_id).sum()) == 3 * 2 * 4 // config.vision_config.spatial_merge_size**2


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
    assert dataclasses.replace(spec, fixture="other").fixture == "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]
