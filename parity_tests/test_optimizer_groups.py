"""Per-component optimizer groups: every trainable parameter exactly once, at exactly the requested lr and decay."""

from __future__ import annotations

import functools
import logging

import pytest
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st
from trainer_strategies import (
    FAMILY_NAMES,
    FreezePlan,
    apply_freeze_plan,
    cached_model,
    component_lrs,
    freeze_plans,
    module_components,
    tiny_model,
    weight_decays,
)

from qwenvl.train.argument import TrainingArguments
from qwenvl.train.optim import COMPONENTS, UnreachedLearningRate, build_param_groups, classify, group_name
from qwenvl.train.trainer import QwenVLTrainer

_ORDER = [group_name(c, d) for c in COMPONENTS for d in (True, False)]


def expected_lr(component: str, *, lr, mm_projector_lr, vision_tower_lr) -> float:
    chosen = {"base": None, "vision": vision_tower_lr, "projector": mm_projector_lr}[component]
    return lr if chosen is None else chosen


def assert_groups_as_specified(model, groups, *, lr, weight_decay, mm_projector_lr, vision_tower_lr):
    """The spec, checked against the module tree (not against the names ``classify`` reads)."""
    components = module_components(model)
    decay_names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}

    seen: dict[int, int] = {}
    for group in groups:
        assert group["params"], "empty groups are omitted"
        for p in group["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
            name = names[id(p)]
            component = components[id(p)]
            assert group["lr"] == expected_lr(
                component, lr=lr, mm_projector_lr=mm_projector_lr, vision_tower_lr=vision_tower_lr
            ), name
            decays = name in decay_names and not name.endswith("bias")
            assert group["weight_decay"] == (weight_decay if decays else 0.0), name
            assert group["name"] == group_name(component, decays), name
    assert set(seen) == trainable, "every trainable parameter is grouped, no frozen one is"
    assert all(count == 1 for count in seen.values()), "each parameter in exactly one group"
    order = [g["name"] for g in groups]
    assert order == [n for n in _ORDER if n in order], "fixed group order (checkpoints load group by group)"


def _signature(param_groups):
    return [(g["name"], [id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in param_groups]


@functools.lru_cache(maxsize=None)
def _cached_trainer(family: str) -> QwenVLTrainer:
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], optim="adamw_torch")
    return QwenVLTrainer(model=cached_model(family), args=args)


@pytest.mark.parametrize(
    "name, component",
    [
        ("model.visual.merger.mlp.0.weight", "projector"),
        ("model.visual.deepstack_merger_list.1.linear_fc1.bias", "projector"),
        ("model.visual.merger_list.0.mlp.2.weight", "projector"),  # Qwen3-Omni's deepstack mergers
        ("model.visual.downsample.weight", "projector"),  # GLM-4V
        ("model.visual.embeddings.position_embedding.weight", "vision"),  # GLM-4V
        ("model.audio_tower.layers.0.self_attn.q_proj.weight", "vision"),  # Qwen3-Omni (5.x names)
        ("audio_tower.proj2.weight", "vision"),  # Qwen3-Omni (4.57 names)
        ("model.layers.0.mlp.experts.3.down_proj.weight", "base"),  # Qwen3-Omni's text model on 4.57
        ("model.visual.blocks.3.attn.qkv.weight", "vision"),
        ("model.visual.patch_embed.proj.weight", "vision"),
        ("visual.blocks.0.norm1.weight", "vision"),
        ("model.language_model.layers.0.self_attn.q_proj.weight", "base"),
        ("model.language_model.embed_tokens.weight", "base"),
        ("lm_head.weight", "base"),
        ("base_model.model.model.visual.blocks.0.attn.qkv.lora_A.default.weight", "vision"),
        ("base_model.model.model.visual.merger.linear_fc1.lora_B.default.weight", "projector"),
        ("base_model.model.model.visual.modules_to_save.default.merger.mlp.0.weight", "projector"),  # PEFT's copy
        ("base_model.model.model.visual.original_module.deepstack_merger_list.0.norm.weight", "projector"),
        ("base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.default.weight", "base"),
    ],
)
def test_classify(name, component):
    assert classify(name) == component


@settings(max_examples=40, deadline=None)
@given(
    family=st.sampled_from(FAMILY_NAMES),
    plan=freeze_plans(),
    lr=st.floats(min_value=1e-7, max_value=1e-2),
    weight_decay=weight_decays(),
    mm_projector_lr=component_lrs(),
    vision_tower_lr=component_lrs(),
)
@example(family="qwen3_vl", plan=FreezePlan(frozenset(), None), lr=1e-3, weight_decay=0.1,
         mm_projector_lr=None, vision_tower_lr=2e-6)  # fmt: skip
@example(family="qwen2_vl", plan=FreezePlan(frozenset({"visual.blocks", "visual.patch_embed"}), None), lr=1e-3,
         weight_decay=0.0, mm_projector_lr=0.0, vision_tower_lr=0.0)  # fmt: skip
@example(family="qwen3_vl_moe", plan=FreezePlan(frozenset(), 0), lr=1e-3, weight_decay=0.1,
         mm_projector_lr=1e-4, vision_tower_lr=None)  # fmt: skip
@example(family="glm4v_moe", plan=FreezePlan(frozenset({"visual.blocks"}), None), lr=1e-3, weight_decay=0.1,
         mm_projector_lr=1e-4, vision_tower_lr=2e-6)  # fmt: skip
@example(family="qwen3_omni_moe_thinker", plan=FreezePlan(frozenset({"visual.merger"}), None), lr=1e-3,
         weight_decay=0.1, mm_projector_lr=1e-4, vision_tower_lr=0.0)  # fmt: skip
def test_groups_partition_trainable_parameters(family, plan, lr, weight_decay, mm_projector_lr, vision_tower_lr):
    model = cached_model(family)
    apply_freeze_plan(model, plan)
    spec = dict(lr=lr, weight_decay=weight_decay, mm_projector_lr=mm_projector_lr, vision_tower_lr=vision_tower_lr)

    groups = build_param_groups(model, **spec)
    assert_groups_as_specified(model, groups, **spec)

    trainer = _cached_trainer(family)
    assert trainer.model is model
    trainer.args.learning_rate = lr
    trainer.args.weight_decay = weight_decay
    trainer.args.mm_projector_lr = mm_projector_lr
    trainer.args.vision_tower_lr = vision_tower_lr
    # The trainer never trains with a set rate that reaches nothing (build_param_groups' require_reach).
    unreached = [
        what
        for what, component in (("mm_projector_lr", "projector"), ("vision_tower_lr", "vision"))
        if spec[what] is not None and not any(g["name"].startswith(component) for g in groups)
    ]
    if unreached:
        for call in (lambda: trainer.create_optimizer(), lambda: trainer.create_optimizer(model)):
            trainer.optimizer = None
            with pytest.raises(UnreachedLearningRate, match=rf"({'|'.join(unreached)})=.* reaches no trainable parameter"):
                call()
        return
    if not groups:
        for call in (lambda: trainer.create_optimizer(), lambda: trainer.create_optimizer(model)):
            trainer.optimizer = None
            with pytest.raises(ValueError, match="empty parameter list"):
                call()
        return
    trainer.optimizer = None
    without_model = trainer.create_optimizer()
    trainer.optimizer = None
    with_model = trainer.create_optimizer(model)
    trainer.optimizer = None
    assert _signature(without_model.param_groups) == _signature(with_model.param_groups) == _signature(groups)
    assert type(without_model).__name__ == "AdamW"


def test_vision_lr_alone_and_zero_lr_warns(caplog):
    model = tiny_model("qwen2_5_vl")
    components = module_components(model)
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.optim"):
        groups = build_param_groups(model, lr=1e-3, weight_decay=0.0, vision_tower_lr=0.0)
    lrs = {components[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert lrs == {"base": 1e-3, "vision": 0.0, "projector": 1e-3}
    assert "vision_tower_lr is 0.0" in caplog.text and "requires_grad=False" in caplog.text


@pytest.mark.parametrize("bad", [-1e-4, float("nan"), float("inf")])
def test_invalid_lr_rejected(bad):
    model = cached_model("qwen2_vl")
    with pytest.raises(ValueError, match="mm_projector_lr"):
        build_param_groups(model, lr=1e-3, weight_decay=0.0, mm_projector_lr=bad)
    with pytest.raises(ValueError, match="vision_tower_lr"):
        TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], vision_tower_lr=bad)


def test_cli_parses_component_lrs(tmp_path):
    parser = transformers.HfArgumentParser((TrainingArguments,))
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--mm_projector_lr", "1e-4", "--vision_tower_lr", "2e-6"]
    )
    assert (args.mm_projector_lr, args.vision_tower_lr) == (1e-4, 2e-6)
    (default,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--use_cpu"])
    assert (default.mm_projector_lr, default.vision_tower_lr) == (None, None)
    help_text = parser.format_help()
    assert "--mm_projector_lr" in help_text and "--vision_tower_lr" in help_text


def test_lora_groups():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("qwen3_vl"),
        peft.LoraConfig(r=2, target_modules=["q_proj", "qkv", "linear_fc1"], modules_to_save=None),
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n and n.startswith("base_model.model.") for n in names)
    assert {classify(n) for n in names} == {"base", "vision", "projector"}
    spec = dict(lr=1e-3, weight_decay=0.05, mm_projector_lr=1e-4, vision_tower_lr=1e-5)
    groups = build_param_groups(model, **spec)
    assert_groups_as_specified(model, groups, **spec)

    trainer = QwenVLTrainer(
        model=model,
        args=TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], learning_rate=1e-3,
                               weight_decay=0.05, mm_projector_lr=1e-4, vision_tower_lr=1e-5),
    )  # fmt: skip
    assert _signature(trainer.create_optimizer().param_groups) == _signature(groups)


def test_bias_never_decays_whatever_the_decay_names():
    model = cached_model("qwen2_vl")
    apply_freeze_plan(model, FreezePlan(frozenset(), None))
    every_name = [n for n, _ in model.named_parameters()]
    groups = build_param_groups(model, lr=1e-3, weight_decay=0.1, decay_parameter_names=every_name)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.0 if names[id(p)].endswith("bias") else 0.1), names[id(p)]


def test_create_optimizer_uses_the_model_it_is_given(tmp_path):
    # transformers 5.3+ passes the prepared model on its FSDP path: its parameters, not self.model's, are optimized.
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], mm_projector_lr=1e-4)
    trainer = QwenVLTrainer(model=tiny_model("qwen2_vl"), args=args)
    other = tiny_model("qwen2_vl", seed=1)
    optimizer = trainer.create_optimizer(other)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in other.parameters()}
    assert_groups_as_specified(other, build_param_groups(other, lr=args.learning_rate, weight_decay=0.0,
                                                         mm_projector_lr=1e-4), lr=args.learning_rate,
                               weight_decay=0.0, mm_projector_lr=1e-4, vision_tower_lr=None)  # fmt: skip
