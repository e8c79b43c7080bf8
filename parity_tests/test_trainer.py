"""QwenVLTrainer end to end: real optimizer steps, the scheduler, checkpoint resume, DeepSpeed refusals."""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import transformers
from trainer_strategies import module_components, tiny_model

from qwenvl.train.argument import TrainingArguments
from qwenvl.train.trainer import QwenVLTrainer, check_deepspeed_config, replace_qwen2_vl_attention_class

LRS = dict(learning_rate=1e-2, mm_projector_lr=3e-3, vision_tower_lr=1e-3)


def _args(tmp_path, **overrides) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], optim="adamw_torch", disable_tqdm=True)
    return TrainingArguments(**{**base, **overrides})


def _lr_of(component: str) -> float:
    return {"base": LRS["learning_rate"], "vision": LRS["vision_tower_lr"], "projector": LRS["mm_projector_lr"]}[
        component
    ]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_first_adamw_step_moves_each_component_by_its_own_lr(tmp_path, family):
    model = tiny_model(family, seed=1)
    weight_decay, eps = 0.1, 1e-8
    trainer = QwenVLTrainer(model=model, args=_args(tmp_path, weight_decay=weight_decay, adam_epsilon=eps, **LRS))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)

    components = module_components(model)
    decay_names = set(transformers.Trainer.get_decay_parameter_names(None, model))
    before = {n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()

    for name, p in model.named_parameters():
        lr = _lr_of(components[id(p)])
        wd = weight_decay if name in decay_names and not name.endswith("bias") else 0.0
        g = p.grad.to(torch.float64)
        # AdamW's first step: m = (1-b1) g, v = (1-b2) g^2; bias correction turns m/(sqrt(v)+eps) into
        # g/(|g|+eps); decay is decoupled and applied first.
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        # float32 rounding of a few operations on numbers of size |p| + lr: a few ulps of that.
        error = (p.detach().to(torch.float64) - expected).abs()
        bound = 4 * torch.finfo(torch.float32).eps * (before[name].abs() + lr)
        assert (error <= bound).all(), f"{name}: error {error.max():.3g} > {bound.max():.3g}"


def test_scheduler_keeps_ratios_through_warmup_and_decay(tmp_path):
    model = tiny_model("qwen3_vl_moe")
    args = _args(tmp_path, warmup_steps=3, lr_scheduler_type="linear", weight_decay=0.01, **LRS)
    trainer = QwenVLTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    components = module_components(model)
    group_component = [components[id(g["params"][0])] for g in optimizer.param_groups]
    assert set(group_component) == {"base", "vision", "projector"}

    factors = []
    for _ in range(8):
        optimizer.step()  # no gradients: a no-op, but the scheduler expects it first
        scheduler.step()
        factor = optimizer.param_groups[0]["lr"] / args.learning_rate
        factors.append(factor)
        for group, component in zip(optimizer.param_groups, group_component):
            assert group["lr"] == pytest.approx(_lr_of(component) * factor, rel=1e-12, abs=0)
    assert factors[2] == pytest.approx(1.0) and 0 < factors[0] < factors[1] < 1 and factors[-1] < 1


class _Recording(QwenVLTrainer):
    """Records every training loss unrounded (the logged ones are rounded)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        if model.training:
            self.losses.append(loss.detach().item())
        return out


def _text_dataset(n: int = 16, length: int = 12):
    gen = torch.Generator().manual_seed(0)
    # Ids below 400 stay clear of the tiny configs' image/video/vision-marker tokens (500-503).
    ids = torch.randint(3, 400, (n, length), generator=gen)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def _train(output_dir, resume_from_checkpoint=None) -> _Recording:
    args = _args(
        output_dir,
        max_steps=6,
        save_steps=3,
        logging_steps=1,
        per_device_train_batch_size=2,
        warmup_steps=2,
        weight_decay=0.01,
        seed=0,
        **LRS,
    )
    trainer = _Recording(model=tiny_model("qwen2_vl", seed=0), args=args, train_dataset=_text_dataset())
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def _lrs(trainer):
    return [(g["name"], g["lr"], g["initial_lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups]


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, capsys):
    full = _train(tmp_path / "full")
    assert "trainable parameters:" in capsys.readouterr().out, "the trainable report is printed when training begins"
    assert len(full.losses) == 6
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert checkpoint.is_dir()

    resumed = _train(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    assert resumed.losses == full.losses[3:]
    assert _lrs(resumed) == _lrs(full)
    assert [g["name"] for g in resumed.optimizer.param_groups] == [
        "base_decay",
        "base_no_decay",
        "vision_decay",
        "vision_no_decay",
        "projector_decay",
        "projector_no_decay",
    ]
    assert {g["initial_lr"] for g in resumed.optimizer.param_groups} == {
        LRS["learning_rate"],
        LRS["vision_tower_lr"],
        LRS["mm_projector_lr"],
    }


DS_WITH_OPTIMIZER = {
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
}


@pytest.mark.parametrize("lrs", [{"mm_projector_lr": 1e-4}, {"vision_tower_lr": 0.0}])
def test_deepspeed_optimizer_block_refused_with_component_lrs(tmp_path, lrs):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_WITH_OPTIMIZER))
    encoded = base64.urlsafe_b64encode(json.dumps(DS_WITH_OPTIMIZER).encode()).decode()
    args = types.SimpleNamespace(**{"mm_projector_lr": None, "vision_tower_lr": None, **lrs})
    for config in (DS_WITH_OPTIMIZER, str(path), path, encoded, types.SimpleNamespace(config=DS_WITH_OPTIMIZER)):
        with pytest.raises(ValueError, match=r"Remove the 'optimizer' block") as info:
            check_deepspeed_config(config, args)
        assert next(iter(lrs)) in str(info.value)


def test_deepspeed_scheduler_block_refused_with_component_lrs():
    config = {"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}}
    with pytest.raises(ValueError, match=r"one learning rate for every parameter group"):
        check_deepspeed_config(config, types.SimpleNamespace(mm_projector_lr=1e-4))


def test_deepspeed_config_harmless_without_component_lrs(caplog):
    with caplog.at_level(logging.INFO, logger="qwenvl.train.trainer"):
        assert check_deepspeed_config(DS_WITH_OPTIMIZER, types.SimpleNamespace()) is True
    assert "DeepSpeed builds it" in caplog.text
    zero_only = {"zero_optimization": {"stage": 3}}
    assert check_deepspeed_config(zero_only, types.SimpleNamespace(mm_projector_lr=1e-4)) is False
    assert check_deepspeed_config(None, types.SimpleNamespace(mm_projector_lr=1e-4)) is False
    with pytest.raises(ValueError, match="neither an existing file"):
        check_deepspeed_config("/nonexistent/ds.json", types.SimpleNamespace())


@pytest.mark.parametrize("where", ["deepspeed", "hf_deepspeed_config"])
def test_trainer_refuses_deepspeed_optimizer_at_construction(tmp_path, where):
    args = _args(tmp_path, mm_projector_lr=1e-4)
    # TrainingArguments(deepspeed=...) needs deepspeed installed; set the field afterwards instead.
    setattr(args, where, DS_WITH_OPTIMIZER if where == "deepspeed" else types.SimpleNamespace(config=DS_WITH_OPTIMIZER))
    with pytest.raises(ValueError, match="Remove the 'optimizer' block"):
        QwenVLTrainer(model=tiny_model("qwen2_vl"), args=args)


def test_optimizer_that_builds_its_own_groups(tmp_path):
    model = tiny_model("qwen2_vl")
    own = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-3}]
    trainer = QwenVLTrainer(model=model, args=_args(tmp_path, vision_tower_lr=1e-5))
    trainer.optimizer_cls_and_kwargs = (torch.optim.SGD, {"lr": 1e-3, "params": own})
    with pytest.raises(ValueError, match="builds its own parameter groups"):
        trainer.create_optimizer()
    trainer.args.vision_tower_lr = None
    assert len(trainer.create_optimizer().param_groups) == 1  # transformers' own path, untouched


def test_explicit_optimizer_is_kept_and_warned_about(tmp_path, caplog):
    model = tiny_model("qwen2_vl")
    mine = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="qwenvl.train.trainer"):
        trainer = QwenVLTrainer(model=model, args=_args(tmp_path, mm_projector_lr=1e-4), optimizers=(mine, None))
    assert "mm_projector_lr are ignored" in caplog.text
    assert trainer.create_optimizer() is mine
    assert trainer.create_optimizer(model) is mine


def test_plain_transformers_arguments_give_base_lr_groups(tmp_path):
    model = tiny_model("qwen2_5_vl")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=2e-4)
    groups = QwenVLTrainer(model=model, args=args).create_optimizer().param_groups
    assert {g["lr"] for g in groups} == {2e-4}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_replace_attention_entry_point_delegates(monkeypatch):
    calls = []
    fake = types.ModuleType("qwenvl.patches")
    fake.patch = lambda backend="auto": calls.append(backend) or "handle"
    monkeypatch.setitem(sys.modules, "qwenvl.patches", fake)
    assert replace_qwen2_vl_attention_class("torch") == "handle"
    assert replace_qwen2_vl_attention_class() == "handle"
    assert calls == ["torch", "auto"]


def test_import_changes_nothing():
    code = (
        "import sys, transformers\n"
        "original = transformers.Trainer.create_optimizer\n"
        "import qwenvl.train.trainer, qwenvl.train.optim, qwenvl.train.report, qwenvl.train.argument\n"
        "assert transformers.Trainer.create_optimizer is original\n"
        "assert 'qwenvl.patches' not in sys.modules, 'importing the trainer must not patch'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env, timeout=120)


def test_evaluate_on_packed_rows_patches_an_unpatched_model_for_the_duration(tmp_path):
    """Like train: evaluate() on packed rows with nothing patched patches the model while it runs (the loss equals
    the explicitly patched one), and leaves nothing patched after; a packed batch is never evaluated unpatched."""
    import qwenvl
    from qwenvl.data import PackedCollator
    from qwenvl.patches import active_patch
    from qwenvl.verify.batches import SampleSpec, make_sample, pack

    model = tiny_model("qwen2_5_vl")
    gen = torch.Generator().manual_seed(0)
    rows = [pack(model, [make_sample(model.config, SampleSpec(n, image=img), generator=gen) for n, img in specs]).items
            for specs in (((9, (4, 4)), (5, None)), ((7, None), (3, (2, 2))))]
    args = _args(tmp_path, per_device_eval_batch_size=1)
    trainer = QwenVLTrainer(model=model, args=args, eval_dataset=rows, data_collator=PackedCollator())
    assert active_patch() is None
    metrics = trainer.evaluate()
    assert active_patch() is None
    with qwenvl.patch(model):
        patched = trainer.evaluate()
    assert metrics["eval_loss"] == patched["eval_loss"] and math.isfinite(metrics["eval_loss"])
