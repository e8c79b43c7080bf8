"""The upstream Qwen-VL fine-tuning code on qwenvl (issue: a real drop-in; docs/migration.md).

``parity_tests/upstream_checkout/`` is a checkout laid out like upstream's ``qwen-vl-finetune/`` (our own files:
a namespace ``qwenvl/`` folder, ``qwenvl/data/`` with its registry in ``__init__.py``, ``qwenvl/train/`` with
``train_qwen.py``, ``trainer.py`` and ``argument.py``). Each test copies it into a scratch folder with demo rows.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import qwenvl._checkout
from qwenvl.data.processor import load_processor
from qwenvl.fixtures import demo_data_path, model_dir
from qwenvl.positions import mm_token_type_ids
from qwenvl.train.argument import TrainingArguments
from qwenvl.train.optim import OptimizerStateMismatch, adopt_optimizer_state
from qwenvl.train.trainer import QwenVLTrainer, replace_qwen2_vl_attention_class
from qwenvl.train.upstream import install

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = Path(__file__).resolve().parent / "upstream_checkout"
MIGRATION = ROOT / "docs" / "migration.md"
SCRIPT = Path("qwenvl") / "train" / "train_qwen.py"
UPSTREAM_IMPORT = "from trainer import replace_qwen2_vl_attention_class"


def _lay_out(folder: Path) -> Path:
    """The test checkout plus demo/: the demo's image rows and their images."""
    root = folder / "qwen-vl-finetune"
    shutil.copytree(CHECKOUT, root, ignore=shutil.ignore_patterns("__pycache__"))
    demo = demo_data_path().parent
    rows = [row for row in json.loads(demo_data_path().read_text()) if "image" in row][:6]
    (root / "demo").mkdir()
    shutil.copytree(demo / "images", root / "demo" / "images")
    (root / "demo" / "data.json").write_text(json.dumps(rows))
    return root


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """The checkout on sys.path, as upstream's script puts it; its modules forgotten afterwards."""
    root = _lay_out(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path, str(root)])
    before = set(sys.modules)
    yield root
    for name in set(sys.modules) - before:
        if name.startswith("qwenvl.") and getattr(sys.modules[name], "__file__", "") and str(root) in sys.modules[name].__file__:
            del sys.modules[name]
    sys.modules.pop("qwenvl.data.__checkout_init__", None)
    qwenvl._checkout._LOADED.clear()


def test_checkout_modules_import_beside_ours(checkout):
    import qwenvl.data.collators
    import qwenvl.data.data_processor as data_processor

    assert Path(data_processor.__file__).is_relative_to(checkout)
    assert Path(qwenvl.data.collators.__file__).is_relative_to(ROOT / "qwenvl") or "site-packages" in qwenvl.data.collators.__file__
    # upstream's data_processor reads its registry from the package's __init__: `from . import data_list`
    from qwenvl.data import data_list

    assert data_list(["demo%50"])[0]["sampling_rate"] == 0.5
    with pytest.raises(AttributeError):
        qwenvl.data.no_such_name  # noqa: B018
    # its argument.py is shadowed by ours: one line saying what to do, not a bare ImportError
    with pytest.raises(ImportError, match=r"upstream checkout's .*argument\.py defines it: call qwenvl\.train\.upstream\.install\(\)"):
        from qwenvl.train.argument import ModelArguments  # noqa: F401


def test_install_uses_the_checkout_arguments_and_reverts_exactly(checkout):
    from qwenvl.train import argument as ours

    create, load, train = (vars(transformers.Trainer)[n] for n in ("create_optimizer", "_load_optimizer_and_scheduler", "train"))
    entry = transformers.Qwen2_5_VLForConditionalGeneration
    had_visual = "visual" in vars(entry)
    with install() as handle:
        from qwenvl.train.argument import DataArguments, ModelArguments, TrainingArguments as Theirs

        assert Path(inspect.getfile(Theirs)).is_relative_to(checkout)
        assert {"model_max_length", "cache_dir"} <= {f for f in Theirs.__dataclass_fields__}
        assert "dataset_use" in DataArguments.__dataclass_fields__ and "tune_mm_llm" in ModelArguments.__dataclass_fields__
        assert handle.checkout_modules == {"qwenvl.train.argument": str(checkout / "qwenvl" / "train" / "argument.py")}
        assert vars(transformers.Trainer)["create_optimizer"] is not create
        assert hasattr(entry, "visual") and hasattr(entry, "language_model")
        assert install().checkout_modules == {}  # twice is harmless
    assert sys.modules["qwenvl.train.argument"] is ours
    assert [vars(transformers.Trainer)[n] for n in ("create_optimizer", "_load_optimizer_and_scheduler", "train")] == [create, load, train]
    assert ("visual" in vars(entry)) == had_visual
    assert not hasattr(transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLPreTrainedModel, "print_trainable_parameters")


def _model(family):
    return transformers.AutoModelForImageTextToText.from_pretrained(model_dir(family), dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_upstream_flattened_batch_equals_each_sample_alone(checkout, family):
    """Rows built by the checkout's own dataset and flattened collator, through our replace_qwen2_vl_attention_class:
    the logits of each sample and the packed loss are those of the samples run alone, unpatched."""
    from types import SimpleNamespace

    from qwenvl.data.data_processor import make_supervised_data_module

    processor = load_processor(model_dir(family))
    module = make_supervised_data_module(processor, SimpleNamespace(dataset_use="demo", data_flatten=True, data_packing=False))
    samples = [module["train_dataset"][i] for i in range(3)]
    batch = module["data_collator"](samples)
    model = _model(family)
    takes_types = "mm_token_type_ids" in inspect.signature(type(model).forward).parameters
    with torch.no_grad():
        alone, losses, counts = [], [], []
        for s in samples:
            ids = s["input_ids"][None]
            extra = {"mm_token_type_ids": mm_token_type_ids(model.config, ids)} if takes_types else {}
            out = model(input_ids=ids, pixel_values=s["pixel_values"], image_grid_thw=s["image_grid_thw"],
                        labels=s["labels"][None], use_cache=False, **extra)
            alone.append(out.logits[0])
            counts.append(int((s["labels"][1:] != -100).sum()))
            losses.append(out.loss * counts[-1])
        handle = replace_qwen2_vl_attention_class()
        try:
            packed = model(**batch)
        finally:
            handle.revert()
    torch.testing.assert_close(packed.logits[0], torch.cat(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.loss, sum(losses) / sum(counts), atol=1e-6, rtol=1e-6)


def _upstream_trainer_module(checkout, monkeypatch):
    """The checkout's trainer.py, imported as upstream's script does (its import-time patches recorded for undo)."""
    monkeypatch.setattr(transformers.Trainer, "create_optimizer", transformers.Trainer.create_optimizer)
    for cls in (transformers.Qwen2_5_VLModel, transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel):
        monkeypatch.setattr(cls, "print_trainable_parameters", None, raising=False)
    spec = importlib.util.spec_from_file_location("upstream_trainer", checkout / "qwenvl" / "train" / "trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lrs", [{}, {"mm_projector_lr": 1e-4}, {"mm_projector_lr": 1e-4, "vision_tower_lr": 2e-5}])
def test_upstream_optimizer_state_maps_onto_ours_by_parameter(checkout, monkeypatch, tmp_path, lrs):
    upstream = _upstream_trainer_module(checkout, monkeypatch)
    model = _model("qwen2_5_vl").train()
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, report_to=[], use_cpu=True, **lrs)
    theirs = transformers.Trainer(model=model, args=args)
    optimizer = upstream.create_optimizer(theirs)
    assert len(optimizer.param_groups) == 2 + 2 * len(lrs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # half-way through a schedule
    ids = torch.randint(3, 400, (1, 12))
    inputs = {"input_ids": ids, "labels": ids}
    model(**inputs).loss.backward()
    optimizer.step()
    scheduler.step()
    saved = optimizer.state_dict()

    ours = QwenVLTrainer(model=model, args=args).create_optimizer()
    ours.load_state_dict(adopt_optimizer_state(saved, ours, model))
    moved = [p for group in optimizer.param_groups for p in group["params"] if optimizer.state.get(p)]
    assert moved and all(ours.state.get(p) for p in moved)
    for p in moved:
        for key, value in optimizer.state[p].items():
            torch.testing.assert_close(ours.state[p][key], value, atol=0, rtol=0)
    rates = {"base": 1e-3, "vision": lrs.get("vision_tower_lr", 1e-3), "projector": lrs.get("mm_projector_lr", 1e-3)}
    assert {g["name"]: g["lr"] for g in ours.param_groups} == {
        g["name"]: 0.5 * rates[g["name"].split("_")[0]] for g in ours.param_groups
    }
    # another model's state: refused in one line
    for name, p in model.named_parameters():
        p.requires_grad_("visual" not in name)
    frozen = QwenVLTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)).create_optimizer()
    with pytest.raises(OptimizerStateMismatch, match="fit neither|would make") as info:
        adopt_optimizer_state(saved, frozen, model)
    assert "\n" not in str(info.value)


def _migrated(root: Path) -> None:
    """Apply docs/migration.md's one changed line to the checkout's script."""
    line = re.search(r"^from qwenvl\.train\.upstream import .*$", MIGRATION.read_text(), re.M).group(0)
    script = root / SCRIPT
    text = script.read_text()
    assert text.count(UPSTREAM_IMPORT) == 1
    script.write_text(text.replace(UPSTREAM_IMPORT, line))


def _run(root: Path, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, *(["-c", script] if script else [str(SCRIPT)]), *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)


MODEL = ["--model_name_or_path", str(model_dir("qwen2_5_vl")), "--dataset_use", "demo"]
COMMON = ["--per_device_train_batch_size", "2",
          "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--report_to", "none", "--use_cpu", "True",
          "--save_strategy", "steps", "--save_steps", "2", "--dataloader_num_workers", "0", "--logging_steps", "1"]


@pytest.mark.slow
def test_train_qwen_runs_on_qwenvl_with_one_line_changed(tmp_path):
    root = _lay_out(tmp_path)
    _migrated(root)
    result = _run(root, *MODEL, *COMMON, "--output_dir", "out", "--max_steps", "3", "--data_flatten", "True",
                  "--tune_mm_vision", "True", "--tune_mm_mlp", "True", "--tune_mm_llm", "True",
                  "--mm_projector_lr", "1e-4", "--vision_tower_lr", "2e-5")
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("Vision Module - Attention Blocks:", "Trainable Block Indices: [0, 1]", "Merger Module Trainable: True",
                 "LLM Module - Embed Tokens Trainable: True", "LLM Module - Trainable Layer Indices: [0, 1]"):
        assert line in result.stdout, result.stdout
    state = torch.load(root / "out" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    lrs = {g["name"]: g["lr"] for g in state["param_groups"]}
    assert lrs == {"base_decay": 1e-3, "base_no_decay": 1e-3, "vision_decay": 2e-5, "vision_no_decay": 2e-5,
                   "projector_decay": 1e-4, "projector_no_decay": 1e-4}
    assert (root / "out" / "config.json").is_file()

    # a rate for a component that does not train is an error, never silently nothing
    frozen = _run(root, *MODEL, *COMMON, "--output_dir", "frozen", "--max_steps", "1", "--data_flatten", "True",
                  "--tune_mm_vision", "False", "--tune_mm_mlp", "True", "--tune_mm_llm", "True", "--vision_tower_lr", "2e-5")
    assert frozen.returncode != 0 and "vision_tower_lr=2e-05 reaches no trainable parameter" in frozen.stderr


UPSTREAM_RUN = """
import sys, transformers
from types import SimpleNamespace
sys.path[:0] = ['qwenvl/train']; sys.path.append('.')
import trainer  # the checkout's trainer.py: upstream's create_optimizer for every Trainer, as its import does
from qwenvl.data.data_processor import make_supervised_data_module
from qwenvl.data.processor import load_processor
from qwenvl.train.argument import TrainingArguments
path, argv = sys.argv[1], sys.argv[2:]
args, = transformers.HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
data = make_supervised_data_module(load_processor(path), SimpleNamespace(dataset_use='demo', data_flatten=False, data_packing=False))
model = transformers.AutoModelForImageTextToText.from_pretrained(path)
transformers.Trainer(model=model, args=args, **data).train()
"""


@pytest.mark.slow
def test_resume_from_an_upstream_checkpoint(tmp_path):
    root = _lay_out(tmp_path)
    lrs = ["--mm_projector_lr", "1e-4", "--vision_tower_lr", "2e-5"]
    first = _run(root, str(model_dir("qwen2_5_vl")), *COMMON, *lrs, "--output_dir", "out", "--max_steps", "2", script=UPSTREAM_RUN)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = torch.load(root / "out" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert len(saved["param_groups"]) == 6 and not any("name" in g for g in saved["param_groups"])  # upstream's layout
    _migrated(root)
    resumed = _run(root, *MODEL, *COMMON, *lrs, "--output_dir", "out", "--max_steps", "4", "--data_flatten", "True",
                   "--tune_mm_vision", "True", "--tune_mm_mlp", "True", "--tune_mm_llm", "True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((root / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    groups = torch.load(root / "out" / "checkpoint-4" / "optimizer.pt", weights_only=False)["param_groups"]
    assert [g["name"] for g in groups][0] == "base_decay"
