"""`qwenvl verify`, the main job: a table, a JSON report, and a non-zero exit on any failure."""

from __future__ import annotations

import json

import pytest

from qwenvl import cli
from qwenvl.patches import active_patch


def test_verify_passes_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = cli.main(["verify", "--family", "qwen2_vl", "--convention", "upstream", "--json", str(out)])
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
    code = cli.main(["verify", "--family", "qwen3_vl", "--backend", "sdpa", "--convention", "hf_kwargs", "--json", str(out)])
    assert code == 1
    assert json.loads(out.read_text())["passed"] is False
    assert "FAIL" in capsys.readouterr().out


def test_verify_reports_a_crashing_case_as_failed(tmp_path, monkeypatch):
    import qwenvl.verify.parity as parity

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(parity, "run_case", crash)
    out = tmp_path / "report.json"
    assert cli.main(["verify", "--family", "qwen2_vl", "--backend", "sdpa", "--convention", "upstream", "--json", str(out)]) == 1
    case = json.loads(out.read_text())["cases"][0]
    assert case["passed"] is False and "RuntimeError: boom" in case["error"]


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit):
        cli.main(["nope"])
