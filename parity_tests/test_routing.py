"""The MoE routing pin of the verify harness (``qwenvl.verify.routing``): it imposes exactly the recorded expert
choice, changes nothing where the choice is the same, counts the tokens it overrode, and finds every family's
MoE blocks (``FamilySpec.moe_block``) on the installed release."""

from __future__ import annotations

import copy

import pytest
import torch

from qwenvl.families import FAMILIES
from qwenvl.fixtures import FAMILY_NAMES, tiny_model
from qwenvl.verify.batches import SampleSpec, make_sample, sample_inputs
from qwenvl.verify.routing import RoutingPin, moe_blocks

MOE_FAMILIES = [name for name in FAMILY_NAMES if FAMILIES[name].moe_block]


def _logits(model, samples):
    with torch.no_grad():
        return torch.cat([model(**sample_inputs(model, s), use_cache=False).logits[0] for s in samples])


def _setup(family):
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(1)
    samples = [make_sample(model.config, SampleSpec(text=n), generator=gen) for n in (17, 30)]
    pin = RoutingPin((FAMILIES[family].moe_block,), model.config.text_config.num_experts_per_tok)
    return model, samples, pin


def test_every_moe_family_names_its_blocks():
    here = [family for family in MOE_FAMILIES if FAMILIES[family].available()]
    assert here, "no MoE family on this release"
    for family in here:
        model = tiny_model(family)
        blocks = moe_blocks(model, (FAMILIES[family].moe_block,))
        # every module of the text model that routes tokens to experts (GLM-4V-MoE's first layer is dense)
        routers = [m for m in model.get_decoder().modules() if hasattr(m, "gate") and hasattr(m, "experts")]
        assert blocks and [id(b) for b in blocks] == [id(m) for m in routers], family


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_replaying_a_models_own_routing_changes_nothing(family):
    model, samples, pin = _setup(family)
    free = _logits(model, samples)
    with pin.record(model):
        recorded = _logits(model, samples)
    with pin.replay(model):
        replayed = _logits(model, samples)
    assert pin.flips == 0
    assert torch.equal(recorded, free) and torch.equal(replayed, free)
    assert sum(t.shape[0] for t in pin.choices[0]) == sum(len(s) for s in samples)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_replay_imposes_the_recorded_choice(family):
    """A model whose routers are negated chooses other experts; replaying the original's routing onto it
    overrides that choice (flips counted) and moves its logits, while its routing weights stay its own."""
    model, samples, pin = _setup(family)
    with pin.record(model):
        _logits(model, samples)
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        for block in moe_blocks(flipped, (FAMILIES[family].moe_block,)):
            block.gate.weight.neg_()
    own = _logits(flipped, samples)
    with pin.replay(flipped):
        imposed = _logits(flipped, samples)
    assert pin.flips > 0
    assert not torch.equal(own, imposed)
    # The imposed choice is the recorded one: recording the replayed run gives back the original choices.
    again = RoutingPin(pin.class_names, pin.top_k)
    with pin.replay(flipped), again.record(flipped):
        _logits(flipped, samples)
    for mine, theirs in zip(again.choices, pin.choices):
        assert torch.equal(torch.cat(mine).sort(-1).values, torch.cat(theirs).sort(-1).values)


def test_a_replay_over_other_tokens_is_refused():
    model, samples, pin = _setup(next(f for f in MOE_FAMILIES if FAMILIES[f].available()))
    with pin.record(model):
        _logits(model, samples[:1])
    with pytest.raises(ValueError, match="more tokens"):
        with pin.replay(model):
            _logits(model, samples)
    with pin.record(model):
        _logits(model, samples)
    with pytest.raises(ValueError, match="fewer tokens"):
        with pin.replay(model):
            _logits(model, samples[:1])
