"""What a new user meets in the first hour: help, version, one-line refusals before anything loads, one warning."""

from __future__ import annotations

import logging

import pytest
import torch

from qwenvl import cli

pytest.importorskip("accelerate", reason="qwenvl train needs the 'train' extra (accelerate)")


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["verify", "--help"], ["train", "--help"], ["train", "-h"]])
def test_every_help_works(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and ("--data_path" in out or argv[0] != "train")


def test_version_names_qwenvl_transformers_and_torch(capsys):
    import transformers

    from qwenvl import __version__

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"qwenvl {__version__} (transformers {transformers.__version__}, torch ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_name_or_path", "/no/such/model"], "--model_name_or_path /no/such/model: no such directory"),
        (["--model_name_or_path", "."], "holds no config.json"),
        (["--mm_projector_lr", "-1"], "mm_projector_lr must be a finite number >= 0"),
    ],
)
def test_bad_model_and_values_are_one_line_before_anything_loads(args, message, tmp_path, capsys, monkeypatch):
    import transformers

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_loading))
    assert cli.main(["train", "--output_dir", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_hub_name_that_cannot_be_resolved_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli.main(["train", "--output_dir", str(tmp_path / "o"), "--model_name_or_path", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be had from the hub" in err[0], err


def test_bad_data_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: 1 / 0))
    data = tmp_path / "bad.json"
    data.write_text('[{"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]}]')
    assert cli.main(["train", "--output_dir", str(tmp_path / "o"), "--data_path", str(data)]) == 2
    assert f"{data} sample 0: 1 <image> tags but 0 image files" in capsys.readouterr().err


def test_the_newer_than_tested_warning_comes_once(monkeypatch, caplog):
    from qwenvl.patches import _versions

    monkeypatch.setattr(_versions, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="qwenvl"):
        for _ in range(3):
            _versions.check_transformers_version("5.99.0")
    assert len([r for r in caplog.records if "newer than the newest" in r.message]) == 1
    caplog.clear()
    monkeypatch.setattr(_versions, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="qwenvl"):
        _versions.check_transformers_version("5.98.0", warn=False)  # qwenvl verify says it itself
        _versions.check_transformers_version("5.98.0")
    assert not caplog.records


def test_a_packed_batch_reaching_an_unpatched_model_is_refused():
    from qwenvl.fixtures import tiny_model
    from qwenvl.train.trainer import UnpatchedPackedBatch, _refuse_unpatched_packed

    model = tiny_model("qwen2_vl")
    batch = {"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.tensor([0, 3, 8], dtype=torch.int32)}
    with pytest.raises(UnpatchedPackedBatch, match="unpatched qwen2_vl model: patch it first"):
        _refuse_unpatched_packed(model, batch)
    _refuse_unpatched_packed(model, {"input_ids": batch["input_ids"], "attention_mask": torch.ones(1, 8)})
    import qwenvl

    with qwenvl.patch(model):
        _refuse_unpatched_packed(model, batch)


def test_backend_help_names_every_backend():
    # qwenvl train's --backend is PatchOptions' field (HfArgumentParser reads its help): the registry is the source.
    from dataclasses import fields

    from qwenvl.attention._registry import BACKENDS
    from qwenvl.options import PatchOptions

    help_text = next(f for f in fields(PatchOptions) if f.name == "backend").metadata["help"]
    assert all(name in help_text for name in ["auto", *BACKENDS]), help_text


def test_packing_convention_help_names_every_convention_the_collator_builds():
    from dataclasses import fields

    from qwenvl.data import CONVENTIONS
    from qwenvl.train.run import DataArguments

    help_text = next(f for f in fields(DataArguments) if f.name == "packing_convention").metadata["help"]
    assert all(name in help_text for name in CONVENTIONS), help_text
