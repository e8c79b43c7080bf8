"""The trainable-parameter report: right per component, counts adding up, logged on rank 0 only."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_strategies import FAMILY_NAMES, apply_freeze_plan, cached_model, freeze_plans, submodule, tiny_model

from qwenvl.families import FAMILIES
from qwenvl.train.report import compress_ranges, log_trainable_report, trainable_report


def _freeze_block0_and_half_block1(model):
    visual = submodule(model, "visual")
    for p in visual.blocks[0].parameters():
        p.requires_grad_(False)
    block1 = list(visual.blocks[1].parameters())
    for p in block1[: len(block1) // 2]:
        p.requires_grad_(False)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_report_per_family(family):
    model = tiny_model(family)
    _freeze_block0_and_half_block1(model)
    for p in model.lm_head.parameters():
        p.requires_grad_(False)
    report = trainable_report(model)

    assert (report.vision_blocks_frozen, report.vision_blocks_partial, report.vision_blocks_trainable) == ([0], [1], [])
    assert report.merger == "trainable" and report.embeddings == "trainable" and report.lm_head == "frozen"
    layers = list(range(len(model.get_decoder().layers)))
    assert report.layers_trainable == layers and not report.layers_partial and not report.layers_frozen
    has_deepstack = FAMILIES[family].deepstack_mergers is not None
    assert report.deepstack_mergers == ("trainable" if has_deepstack else "absent")

    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = submodule(model, "visual").blocks
    assert report.counts["vision_blocks"] == (
        sum(p.numel() for p in blocks.parameters() if p.requires_grad),
        sum(p.numel() for p in blocks.parameters()),
    )
    text = report.format()
    assert "blocks 1 partly trainable, 0 frozen" in text
    assert ("deepstack mergers" in text) == has_deepstack
    assert f"of {report.total:,}" in text


@settings(max_examples=30, deadline=None)
@given(family=st.sampled_from(FAMILY_NAMES), plan=freeze_plans())
def test_report_counts_add_up(family, plan):
    model = cached_model(family)
    apply_freeze_plan(model, plan)
    report = trainable_report(model)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for prefix, modules in (
        ("vision_blocks", submodule(model, "visual").blocks),
        ("layers", model.get_decoder().layers),
    ):
        for i, module in enumerate(modules):
            flags = {p.requires_grad for p in module.parameters()}
            where = "partial" if len(flags) == 2 else "trainable" if flags == {True} else "frozen"
            assert i in getattr(report, f"{prefix}_{where}")
        reported = [i for where in ("trainable", "partial", "frozen") for i in getattr(report, f"{prefix}_{where}")]
        assert sorted(reported) == list(range(len(modules))), "each block/layer reported exactly once"


@given(st.sets(st.integers(0, 40)))
@settings(max_examples=100, deadline=None)
def test_compress_ranges_round_trips(indices):
    text = compress_ranges(indices)
    back = set()
    for part in filter(None, text.split(", ")):
        lo, _, hi = part.partition("-")
        back |= set(range(int(lo), int(hi or lo) + 1))
        assert not hi or int(hi) > int(lo)
    assert back == indices
    runs = [i for i in indices if i - 1 not in indices]
    assert text.count(", ") == max(len(runs) - 1, 0), "maximal runs"


def test_format_compresses_ranges():
    from qwenvl.train.report import TrainableReport

    report = TrainableReport(
        vision_blocks_trainable=list(range(12)),
        vision_blocks_frozen=list(range(12, 32)),
        counts={"vision_blocks": (12, 32)},
    )
    assert "blocks 0-11 trainable, 12-31 frozen" in report.format()


def test_report_under_lora():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("qwen3_vl"), peft.LoraConfig(r=2, target_modules=["qkv", "q_proj"]))
    report = trainable_report(model)
    assert report.vision_blocks_partial == [0, 1] and report.layers_partial == [0, 1]
    assert report.merger == "frozen" and report.embeddings == "frozen" and report.lm_head == "frozen"
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert report.total == sum(p.numel() for p in model.parameters())


def test_tied_lm_head_counted_once():
    model = tiny_model("qwen2_vl", tie_word_embeddings=True)
    model.tie_weights()
    if model.lm_head.weight is not model.model.language_model.embed_tokens.weight:
        pytest.skip("this release does not tie from the text config")
    report = trainable_report(model)
    assert report.lm_head_tied and "tied to embeddings" in report.format()
    assert report.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("env, logged", [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False),
                                         ({"LOCAL_RANK": "2"}, False)])  # fmt: skip
def test_logged_on_rank_zero_only(monkeypatch, caplog, env, logged):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    log = logging.getLogger("test_trainable_report")
    with caplog.at_level(logging.INFO, logger="test_trainable_report"):
        result = log_trainable_report(cached_model("qwen2_vl"), logger=log)
    assert (result is not None) == logged
    assert ("trainable parameters:" in caplog.text) == logged
