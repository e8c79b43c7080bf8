"""`qwenvl verify`, the main job: a table, a JSON report, and a non-zero exit on any failure."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from qwenvl import cli
from qwenvl.attention import BACKENDS, unavailable_reason
from qwenvl.families import FAMILIES
from qwenvl.patches import active_patch


def test_verify_passes_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = cli.main(["verify", "--family", "qwen2_vl", "--packing_convention", "upstream", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0 and report["passed"]
    assert {c["backend"] for c in report["cases"]} >= {"sdpa", "reference"}
    assert all(c["family"] == "qwen2_vl" and c["passed"] for c in report["cases"])
    assert "[1/" in printed and "logits err" in printed and "PASS" in printed
    assert active_patch() is None


def test_verify_exits_non_zero_when_a_case_fails(tmp_path, monkeypatch, capsys):
    import qwenvl.verify.parity as parity

    real = parity.run_case

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result.passed = False
        return result

    monkeypatch.setattr(parity, "run_case", broken)
    out = tmp_path / "report.json"
    code = cli.main(["verify", "--family", "qwen3_vl", "--backend", "sdpa", "--packing_convention", "hf_kwargs", "--json", str(out)])
    assert code == 1
    report = _strict_json(out)
    assert report["passed"] is False and report["cases"][0]["passed"] is False
    assert "FAIL" in capsys.readouterr().out


def test_verify_reports_a_crashing_case_as_failed(tmp_path, monkeypatch):
    import qwenvl.verify.parity as parity

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(parity, "run_case", crash)
    out = tmp_path / "report.json"
    assert cli.main(["verify", "--family", "qwen2_vl", "--backend", "sdpa", "--packing_convention", "upstream", "--json", str(out)]) == 1
    case = _strict_json(out)["cases"][0]
    assert case["passed"] is False and "RuntimeError: boom" in case["error"]
    assert case["logits_err"] is None and case["grad_bound"] is None


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit):
        cli.main(["nope"])


def _strict_json(path):
    """The report parsed as JSON proper: NaN and Infinity, which Python's json accepts, are refused."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _fake_run_case(calls, **result):
    """Stands in for ``run_case`` (a real case takes seconds): records each call, returns a passing row."""

    def run_case(family, *, backend, device, dtype, convention, autocast=None):
        calls.append((family, backend, device, dtype, convention, autocast))
        row = dict(
            family=family, backend=backend, device=device,
            dtype=("autocast-" + str(autocast) if autocast else str(dtype)).replace("torch.", ""),
            convention=convention, tokens=1, samples=1, logits_err=0.0, logits_bound=1.0, grad_err=0.0,
            grad_bound=1.0, worst_grad="", passed=True,
        )
        row.update(result)
        return SimpleNamespace(as_dict=lambda: dict(row))

    return run_case


@pytest.fixture
def run_calls(monkeypatch):
    """The cases ``qwenvl verify`` ran, through a fake ``run_case``; CUDA is absent, as on the CI machine."""
    import qwenvl.verify.parity as parity

    calls = []
    monkeypatch.setattr(parity, "run_case", _fake_run_case(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


def _choices(*names):
    return [repr(name) for name in names]


BAD = [
    pytest.param(["--family", "qwen9_vl"], ["'qwen9_vl'", *_choices(*FAMILIES)], id="family"),
    pytest.param(["--backend", "nope"], ["'nope'", *_choices("auto", *BACKENDS)], id="backend"),
    pytest.param(
        ["--dtype", "float64"],
        ["'float64'", *_choices("float32", "bfloat16", "float16", "autocast-bfloat16", "autocast-float16", "fp32", "bf16", "fp16")],
        id="dtype",
    ),
    pytest.param(["--device", "tpu"], ["'tpu'", *_choices("cpu", "cuda")], id="device"),
    pytest.param(["--packing_convention", "packed"], ["'packed'", *_choices(*cli.CONVENTIONS)], id="convention"),
    pytest.param(
        ["--dtype", "fp16"],
        ["float16 on cpu has no tolerance entry", "cpu: float32, bfloat16", "cuda: float32, bfloat16, float16"],
        id="dtype-without-tolerance",
    ),
    pytest.param(["--device", "cuda"], ["cuda was asked for", "sees no CUDA device", "choose from: cpu"], id="no-cuda"),
    pytest.param(
        ["--backend", "torch"],
        [f"torch is not available on cpu ({unavailable_reason('torch', 'cpu')})", "available on cpu: auto, sdpa, reference"],
        id="backend-unavailable",
    ),
    pytest.param(
        ["--device", "cpu", "--backend", "sdpa", "--backend", "flash_attn"],
        [f"flash_attn is not available on cpu ({unavailable_reason('flash_attn', 'cpu')})"],
        id="second-backend-unavailable",
    ),
    pytest.param(["--json", "{tmp}/missing/x.json"], ["directory {tmp}/missing does not exist"], id="json-dir-missing"),
    pytest.param(["--json", "{tmp}"], ["{tmp} is a directory"], id="json-is-a-dir"),
]


@pytest.mark.parametrize("argv, expected", BAD)
def test_bad_option_is_one_line_before_any_case(argv, expected, run_calls, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verify", "--json", str(tmp_path / "r.json"), *argv])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert all(text.format(tmp=tmp_path) in errors[0] for text in expected), errors[0]
    assert run_calls == [] and out == ""
    assert not (tmp_path / "r.json").exists()


def test_unsupported_transformers_is_one_line(run_calls, monkeypatch, tmp_path, capsys):
    import qwenvl.patches._versions as versions

    monkeypatch.setattr(versions, "installed_version", lambda: "4.40.0")
    code = cli.main(["verify", "--family", "qwen2_vl", "--packing_convention", "upstream", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 2 and run_calls == [] and out == ""
    assert err.splitlines() == [err.strip()] and "4.40.0" in err and ">=4.57.0,<6.0.0" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "short, long, dtype, autocast",
    [
        ("fp32", "float32", torch.float32, None),
        ("bf16", "bfloat16", torch.bfloat16, None),
        ("autocast-bf16", "autocast-bfloat16", torch.float32, torch.bfloat16),  # a float32 model under autocast
    ],
)
def test_dtype_aliases(short, long, dtype, autocast, run_calls, tmp_path):
    for name in (short, long):
        argv = ["verify", "--family", "qwen2_vl", "--backend", "sdpa", "--packing_convention", "upstream", "--dtype", name]
        assert cli.main([*argv, "--json", str(tmp_path / "r.json")]) == 0
        assert _strict_json(tmp_path / "r.json")["cases"][0]["dtype"] == long
    assert [call[3:] for call in run_calls] == [(dtype, "upstream", autocast)] * 2


def test_a_release_that_cannot_autocast_a_family_leaves_it_out_named():
    from qwenvl.verify.plan import _release_limits

    cases = [("qwen3_vl_moe", "sdpa", "cpu", "autocast-bfloat16", "upstream"), ("qwen3_vl_moe", "sdpa", "cpu", "float32", "upstream")]
    kept, limits = _release_limits(cases, ["qwen3_vl_moe"], "4.57.6")
    assert kept == cases[1:]
    assert [(x["family"], x["limit"]) for x in limits] == [("qwen3_vl_moe", "autocast-bfloat16 cannot run on cpu")]
    assert "scatter_" in limits[0]["reason"] and "4.57.6" in limits[0]["reason"]
    assert _release_limits(cases, ["qwen3_vl_moe"], "5.25.0") == (cases, [])


def test_default_run_says_what_it_skipped_and_why(run_calls, tmp_path, capsys):
    out_path = tmp_path / "r.json"
    assert cli.main(["verify", "--family", "qwen2_vl", "--packing_convention", "upstream", "--json", str(out_path)]) == 0
    out = capsys.readouterr().out
    unavailable = {name: unavailable_reason(name, "cpu") for name in BACKENDS}
    ran = {call[1] for call in run_calls}
    assert ran == {name for name, why in unavailable.items() if why is None}
    lines = out.splitlines()
    first_case = next(i for i, line in enumerate(lines) if line.startswith("[1/"))
    skip_line = next(line for line in lines[:first_case] if line.startswith("skipped:"))  # said before it runs
    assert "device cuda (" in skip_line
    for name, why in unavailable.items():
        assert (f"{name} on cpu ({why})" in skip_line) == (why is not None)
    skipped = _strict_json(out_path)["skipped"]
    assert {(s.get("backend"), s["device"]) for s in skipped} == {(None, "cuda")} | {
        (name, "cpu") for name, why in unavailable.items() if why is not None
    }


def test_non_finite_errors_are_null_in_the_report(monkeypatch, tmp_path):
    import qwenvl.verify.parity as parity

    monkeypatch.setattr(parity, "run_case", _fake_run_case([], logits_err=float("nan"), grad_err=float("inf"), passed=False))
    out = tmp_path / "r.json"
    assert cli.main(["verify", "--family", "qwen2_vl", "--backend", "sdpa", "--packing_convention", "upstream", "--json", str(out)]) == 1
    case = _strict_json(out)["cases"][0]
    assert case["logits_err"] is None and case["grad_err"] is None and case["passed"] is False


def test_a_case_the_unpatched_model_cannot_run_is_a_named_limit_not_a_failure(monkeypatch, tmp_path, capsys):
    """``run_case`` raising ``UpstreamLimit`` once running (an unpatched model that fails under autocast on this
    device): the case joins what was left out, with why, in the output, the JSON and the last line; the others run."""
    import qwenvl.verify.parity as parity
    from qwenvl.release_bugs import UpstreamLimit

    calls = []
    fake = _fake_run_case(calls)

    def run_case(family, **kwargs):
        if family == "qwen2_5_vl":
            raise UpstreamLimit("the unpatched qwen2_5_vl fails under torch.bfloat16 autocast on cpu: RuntimeError: x")
        return fake(family, **kwargs)

    monkeypatch.setattr(parity, "run_case", run_case)
    out = tmp_path / "r.json"
    argv = ["verify", "--family", "qwen2_vl", "--family", "qwen2_5_vl", "--backend", "sdpa", "--packing_convention",
            "upstream", "--dtype", "autocast-bf16", "--no_golden", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    report = _strict_json(out)
    assert [c["family"] for c in report["cases"]] == ["qwen2_vl"]
    limit = {"family": "qwen2_5_vl", "device": "cpu", "limit": "autocast-bfloat16 cannot run on cpu",
             "reason": "the unpatched qwen2_5_vl fails under torch.bfloat16 autocast on cpu: RuntimeError: x"}  # fmt: skip
    assert limit in report["skipped"]
    assert "LIMIT (the unpatched qwen2_5_vl fails" in printed and "qwen2_5_vl: autocast-bfloat16 cannot run on cpu" in printed


def test_help_is_plain_text_and_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["-h"])
    top = capsys.readouterr().out
    assert "``" not in top and "verify" in top
    with pytest.raises(SystemExit):
        cli.main(["verify", "-h"])
    text = " ".join(capsys.readouterr().out.split())
    for name in [*FAMILIES, "auto", *BACKENDS, "cpu", "cuda", "float32", "bfloat16", "float16", *cli.CONVENTIONS]:
        assert name in text


def test_verify_leaves_out_videos_where_the_release_cannot_run_them():
    # Qwen3-Omni's videos fail upstream on 5.0.0 (FamilySpec.release_bugs): its cases there run without the video.
    from qwenvl.cli import _specs_for
    from qwenvl.families import FAMILIES
    from qwenvl.verify.parity import DEFAULT_SPECS

    assert FAMILIES["qwen3_omni_moe_thinker"].release_bug("videos", "5.0.0")
    assert _specs_for("qwen3_omni_moe_thinker", "5.24.0") == DEFAULT_SPECS
    assert _specs_for("qwen3_omni_moe_thinker", "5.0.0") == tuple(s for s in DEFAULT_SPECS if s.video is None)
    assert any(s.video for s in DEFAULT_SPECS) and _specs_for("qwen2_vl", "5.0.0") == DEFAULT_SPECS
