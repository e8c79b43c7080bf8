"""``qwenvl.patch``'s options (``qwenvl.options.PatchOptions``): one name each, the same in ``qwenvl train`` and
``qwenvl verify``, with the old names still accepted (a one-line note), and a bad value refused in one line."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import asdict, fields
from types import SimpleNamespace

import pytest
import torch

import qwenvl
from qwenvl import cli
from qwenvl.attention import BACKENDS
from qwenvl.fixtures import tiny_model
from qwenvl.options import CHOICES, RENAMED, InvalidOption, PatchOptions, current_names

NAMES = [f.name for f in fields(PatchOptions)]
GIVEN = PatchOptions(backend="sdpa", linear_backend="segments", compile=True, fused_cross_entropy=True)


def test_patch_takes_the_options_under_their_names():
    params = inspect.signature(qwenvl.patch).parameters
    for f in fields(PatchOptions):
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default, f.name
    assert CHOICES["backend"].values == ("auto", *BACKENDS)
    assert all(getattr(PatchOptions(), name) == choices.values[0] for name, choices in CHOICES.items())
    model = tiny_model("qwen2_vl")
    with qwenvl.patch(model, options=PatchOptions(backend="sdpa", fused_cross_entropy=True)) as handle:
        assert handle.backend == "sdpa" and "forward" in model.__dict__
    assert "forward" not in model.__dict__
    with pytest.raises(ValueError, match="as keywords or as options=PatchOptions"):
        qwenvl.patch(model, backend="sdpa", options=PatchOptions())


def test_a_bad_value_names_the_keyword_or_the_flag():
    with pytest.raises(InvalidOption) as info:
        PatchOptions(linear_backend="nope")
    assert str(info.value) == "unknown linear_backend 'nope'; choose one of: auto, segments, batched, torch, fla"
    assert info.value.flag() == "--linear_backend 'nope' is not one of auto, segments, batched, torch, fla"


def test_old_names_are_rewritten_once_each_with_a_note(capsys):
    argv = ["--attention-backend=sdpa", "--compile_regions", "True", "--attention_backend", "torch", "--backend_x"]
    assert current_names("train", argv) == ["--backend=sdpa", "--compile", "True", "--backend", "torch", "--backend_x"]
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "qwenvl train: --attention-backend is deprecated, use --backend (same values)",
        "qwenvl train: --compile_regions is deprecated, use --compile (same values)",
        "qwenvl train: --attention_backend is deprecated, use --backend (same values)",
    ]
    assert current_names("verify", ["--packing_convention", "upstream"]) == ["--packing_convention", "upstream"]
    assert capsys.readouterr().err == ""


# --- qwenvl train ------------------------------------------------------------------------------------------------


@pytest.fixture
def train_options(monkeypatch):
    """The ``PatchOptions`` ``qwenvl train`` hands to ``run`` (which does not train here)."""
    pytest.importorskip("accelerate", reason="the Trainer needs the 'train' extra (accelerate)")
    import qwenvl.train.run as train_run

    seen = []

    def run(model_args, data_args, training_args, *, options):
        seen.append(options)
        return {}

    monkeypatch.setattr(train_run, "run", run)
    return seen


TRAIN_ARGV = {
    "names": ["--backend", "sdpa", "--linear_backend", "segments", "--compile", "True", "--fused_cross_entropy", "True"],
    "kebab": ["--backend", "sdpa", "--linear-backend", "segments", "--compile", "--fused-cross-entropy", "True"],
    "old names": ["--attention_backend", "sdpa", "--linear_backend", "segments", "--compile-regions", "--fused_cross_entropy"],
}


@pytest.mark.parametrize("spelling", TRAIN_ARGV)
def test_train_takes_the_options(spelling, train_options, tmp_path, capsys):
    assert cli.main(["train", "--output_dir", str(tmp_path / "o"), *TRAIN_ARGV[spelling]]) == 0
    assert train_options == [GIVEN]
    notes = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    old = [flag for flag in TRAIN_ARGV[spelling] if "--" + flag[2:].replace("-", "_") in RENAMED["train"]]
    assert len(notes) == len(old) and all(any(flag in note for note in notes) for flag in old), notes


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "nope"], "--backend 'nope' is not one of auto, "),
        (["--attention_backend", "nope"], "--backend 'nope' is not one of auto, "),
        (["--linear-backend", "nope"], "--linear_backend 'nope' is not one of auto, segments, batched, torch, fla"),
    ],
)
def test_train_refuses_a_bad_value_in_one_line(args, message, train_options, tmp_path, capsys):
    assert cli.main(["train", "--output_dir", str(tmp_path / "o"), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "deprecated" not in line]
    assert len(errors) == 1 and errors[0].startswith(f"qwenvl train: error: {message}"), errors
    assert train_options == []


def test_train_help_names_each_option_once(train_options, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for name in NAMES:
        assert re.search(rf"--{name}(?![\w-])", text), name
    for old in RENAMED["train"]:
        assert old not in text


# --- qwenvl verify -----------------------------------------------------------------------------------------------


@pytest.fixture
def verify_calls(monkeypatch):
    """The keywords each case of ``qwenvl verify`` hands to ``run_case`` (which runs nothing here); no CUDA."""
    import qwenvl.verify.parity as parity

    calls = []

    def run_case(family, **kwargs):
        calls.append(kwargs)
        row = dict(
            family=family, backend=kwargs["backend"], device=kwargs["device"], dtype="float32",
            convention=kwargs["convention"], tokens=1, samples=1, logits_err=0.0, logits_bound=1.0, grad_err=0.0,
            grad_bound=1.0, worst_grad="", passed=True,
        )
        return SimpleNamespace(as_dict=lambda: dict(row))

    monkeypatch.setattr(parity, "run_case", run_case)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


VERIFY_ARGV = {
    "names": ["--linear_backend", "segments", "--compile", "--fused_cross_entropy", "--packing_convention", "hf_positions"],
    "kebab": ["--linear-backend", "segments", "--compile", "--fused-cross-entropy", "--packing-convention", "hf_positions"],
    "old names": ["--linear_backend", "segments", "--compile", "--fused_cross_entropy", "--convention", "hf_positions"],
}


@pytest.mark.parametrize("spelling", VERIFY_ARGV)
def test_verify_takes_the_options(spelling, verify_calls, tmp_path, capsys):
    argv = ["verify", "--family", "qwen2_vl", "--backend", "sdpa", "--no_golden", "--json", str(tmp_path / "r.json")]
    assert cli.main([*argv, *VERIFY_ARGV[spelling]]) == 0
    assert len(verify_calls) == 1
    call = verify_calls[0]
    assert {name: call[name] for name in NAMES} == asdict(GIVEN) and call["convention"] == "hf_positions"
    notes = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    expected = ["qwenvl verify: --convention is deprecated, use --packing_convention (same values)"]
    assert notes == (expected if spelling == "old names" else [])
    case = json.loads((tmp_path / "r.json").read_text())["cases"][0]
    assert {name: case[name] for name in ("linear_backend", "compile", "fused_cross_entropy")} == {
        "linear_backend": "segments", "compile": True, "fused_cross_entropy": True
    }


def test_verify_help_names_each_option_once_in_both_spellings(capsys):
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    text = capsys.readouterr().out
    for name in [*NAMES, "packing_convention", "no_golden", "fail_on_drift"]:
        assert re.search(rf"--{name}(?![\w-])", text), name
        assert "_" not in name or f"--{name.replace('_', '-')}" in text, name
    for old in RENAMED["verify"]:
        assert not re.search(rf"{old}(?![\w-])", text), old


@pytest.mark.parametrize(
    "args, message",
    [
        (["--linear_backend", "nope"], "argument --linear_backend/--linear-backend: invalid choice: 'nope'"),
        (["--convention", "nope"], "argument --packing_convention/--packing-convention: invalid choice: 'nope'"),
    ],
)
def test_verify_refuses_a_bad_value_in_one_line(args, message, verify_calls, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as info:
        cli.main(["verify", "--json", str(tmp_path / "r.json"), *args])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert verify_calls == []


def _verify_fused(tmp_path) -> tuple[int, dict]:
    out = tmp_path / "r.json"
    argv = ["verify", "--family", "qwen2_vl", "--backend", "sdpa", "--device", "cpu", "--packing_convention", "upstream"]
    code = cli.main([*argv, "--fused_cross_entropy", "--no_golden", "--json", str(out)])
    return code, json.loads(out.read_text())["cases"][0]


def test_verify_trains_the_packed_side_through_the_fused_loss(tmp_path, monkeypatch):
    import qwenvl.patches._loss as loss

    real, calls = loss.linear_cross_entropy, []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(loss, "linear_cross_entropy", counted)
    code, case = _verify_fused(tmp_path)
    assert code == 0 and case["passed"] and case["fused_cross_entropy"] is True
    assert calls, "the fused loss never ran"
    assert case["logits_err"] is None and 0 <= case["loss_err"] <= case["loss_bound"]


def test_verify_fails_a_fused_loss_that_is_off(tmp_path, monkeypatch):
    import qwenvl.patches._loss as loss

    real = loss.linear_cross_entropy
    monkeypatch.setattr(loss, "linear_cross_entropy", lambda *args, **kwargs: real(*args, **kwargs) * (1 + 1e-4))
    code, case = _verify_fused(tmp_path)
    assert code == 1 and not case["passed"] and case["loss_err"] > case["loss_bound"]
