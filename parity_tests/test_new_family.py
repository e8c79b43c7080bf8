"""A new family is its spec: registered here under a new name and model_type, nothing else edited.

Each synthetic family copies an existing family's ``FamilySpec`` and takes a subclass of its config class with a new
``model_type``, registered with ``AutoConfig`` (transformers' way to add a model type); it reuses the existing
modeling module, entry classes and fixture config. Everything qwenvl derives from the registry must then work for it
as it does for the family it copies: the fixtures (``tiny_config``, ``tiny_model``, ``token_ids``, the fixture
script's processor recipe), ``qwenvl.patch``, the packed-vs-alone parity (``qwenvl.verify.parity.run_case``), the
optimizer groups, the trainable report and the golden gradient selection. Every registration is undone afterwards
(checked). A failure here names a per-family fact living outside ``FamilySpec``: make it a field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import transformers
from trainer_strategies import module_components
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import qwenvl
from qwenvl.families import FAMILIES, available_families, family_of_model, get_family
from qwenvl.fixtures import tiny_config, tiny_model, token_ids
from qwenvl.patches import active_patch
from qwenvl.train.optim import build_param_groups
from qwenvl.train.report import trainable_report
from qwenvl.verify.golden_files import selected_parameters
from qwenvl.verify.parity import run_case

ROOT = Path(__file__).resolve().parents[1]
# Copied families: deepstack mergers and timestamped video groups (Qwen3-VL), a MoE with its router loss (Qwen3-VL-MoE),
# other span tokens shared by images and videos (GLM-4V); all of them on every release of the matrix.
BASES = [name for name in ("qwen3_vl", "qwen3_vl_moe", "glm4v") if name in available_families()]


PREFIX = "qwenvl_synthetic_"


def _base(synthetic):
    """The spec of the family ``synthetic`` copies."""
    return FAMILIES[synthetic.name.removeprefix(PREFIX)]


@pytest.fixture(params=BASES)
def synthetic(request):
    """The spec of a new family copying ``request.param``'s, registered for the test and unregistered after."""
    base = FAMILIES[request.param]
    name = PREFIX + base.name
    config_cls = type(f"QwenvlSynthetic{base.config_class}", (base.config_type(),), {"model_type": name})
    spec = dataclasses.replace(base, name=name, config_class=config_cls.__name__, fixture=base.fixture)
    with pytest.MonkeyPatch.context() as mp:
        # AutoConfig.register writes into this dict: a copy for the test, the original put back after.
        mp.setattr(CONFIG_MAPPING, "_extra_content", dict(CONFIG_MAPPING._extra_content))
        transformers.AutoConfig.register(name, config_cls)
        mp.setitem(FAMILIES, name, spec)
        yield spec
    assert name not in FAMILIES and name not in CONFIG_MAPPING, "the synthetic family outlived its test"
    assert active_patch() is None


def test_the_fixtures_build_it(synthetic):
    base = _base(synthetic)
    config = tiny_config(synthetic.name)
    assert type(config).__name__ == synthetic.config_class and config.model_type == synthetic.name
    assert transformers.AutoConfig.for_model(synthetic.name).model_type == synthetic.name
    model = tiny_model(synthetic.name)
    assert family_of_model(model) is get_family(synthetic.name) is synthetic
    assert token_ids(synthetic.name) == token_ids(base.name)
    assert synthetic.name in available_families()


def test_the_fixture_script_takes_it(synthetic, monkeypatch):
    """``scripts/make_fixtures.py`` finds the processor recipe by the family (Qwen3-VL's unless the family brings
    its own), and writes its model type."""
    module_spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, module_spec.name, make_fixtures)  # its dataclasses look their module up
    module_spec.loader.exec_module(make_fixtures)
    base = _base(synthetic)
    if make_fixtures.recipe(base) is not make_fixtures.DEFAULT_RECIPE:
        # A family whose processor is not Qwen3-VL's brings its recipe: the one entry the script takes.
        monkeypatch.setitem(make_fixtures.PROCESSORS, synthetic.name, make_fixtures.recipe(base))
    assert make_fixtures.recipe(synthetic) is make_fixtures.recipe(base)
    assert make_fixtures.processor_files(make_fixtures.recipe(synthetic)) == make_fixtures.processor_files(
        make_fixtures.recipe(base)
    )
    written = make_fixtures.model_config(synthetic)
    assert written["model_type"] == synthetic.name and written["architectures"] == [synthetic.entry_classes[0]]


def test_patch_takes_it_and_reverts(synthetic):
    model = tiny_model(synthetic.name)
    entry = synthetic.entry_type()
    forward = entry.forward
    with qwenvl.patch(model) as handle:
        assert handle.families == (synthetic.name,)
        assert entry.forward is not forward
    assert entry.forward is forward and active_patch() is None


def test_packed_equals_each_sample_alone(synthetic):
    result = run_case(synthetic.name)
    assert result.family == synthetic.name
    assert result.passed, result


def test_optimizer_groups_and_trainable_report(synthetic):
    model = tiny_model(synthetic.name)
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.1, mm_projector_lr=1e-4, vision_tower_lr=1e-5)
    components = module_components(model)  # from the module tree and the spec, not from names
    by_lr = {1e-3: "base", 1e-5: "vision", 1e-4: "projector"}
    assert {id(p): by_lr[group["lr"]] for group in groups for p in group["params"]} == components
    report = trainable_report(model)
    assert report.total == sum(p.numel() for p in model.parameters()) == report.trainable
    assert report.merger == "trainable"
    assert report.deepstack_mergers == ("absent" if synthetic.deepstack_mergers is None else "trainable")


def test_the_golden_selection_reads_its_spec(synthetic):
    names = selected_parameters(tiny_model(synthetic.name))
    assert any(".self_attn.k_proj.weight" in name for name in names)
    if synthetic.deepstack_mergers is not None:
        assert any(f".{synthetic.deepstack_mergers}." in name for name in names)
