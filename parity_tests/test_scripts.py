"""The benchmark and maintenance scripts: each answers ``--help``, and the plot draws what the benchmark wrote."""

from __future__ import annotations

import json
from pathlib import Path
import re
import subprocess
import sys

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for folder in ("benchmarks", "scripts") for p in (ROOT / folder).glob("*.py") if "argparse" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_answers_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:300]


def test_the_plot_has_a_bar_per_measured_row_and_says_why_it_cannot(tmp_path):
    result = json.loads((ROOT / "docs/results/model-syncs-h100-run1.json").read_text())
    result["rows"].append({"model": "qwen3_vl", "mix": "mixed", "method": "broken", "error": "OOM"})
    source = tmp_path / "step.json"
    source.write_text(json.dumps(result))
    out = tmp_path / "plot.svg"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/plot_step.py"), str(source), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    svg = out.read_text()
    measured = [r for r in result["rows"] if "ms" in r]
    assert len(re.findall(r'<rect x="170"', svg)) == len(measured) == 8
    fastest = max(measured, key=lambda r: r["tokens_per_s"])
    assert f"{fastest['ms']:.0f} ms" in svg and "broken" not in svg and result["gpu"] in svg
    source.write_text(json.dumps({**result, "rows": []}))
    done = subprocess.run([sys.executable, str(ROOT / "scripts/plot_step.py"), str(source), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no measured rows" in done.stderr


def _benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_step():
    return _benchmark("model_step")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_the_attention_benchmark_times_the_attention_it_names(causal):
    """The attention benchmark's methods that run on the CPU compute the reference's attention (causal or not,
    segment by segment) and are charged for exactly the pairs it attends."""
    from qwenvl.reference.attention import attention_ref, block_diag_mask

    bench = _benchmark("attention_bench")
    lengths = bench.doc_lengths(40, 3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(40, 4, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = attention_ref(q, k, v, block_diag_mask(lengths, causal))
    methods = bench.make_methods(q, k, v, lengths, causal)
    assert tuple(methods) == bench.METHODS  # what --methods accepts is what it can build
    for name in ("ours-sdpa", "dense-sdpa"):
        out = methods[name]()()
        out = out[0].transpose(0, 1) if out.ndim == 4 else out
        torch.testing.assert_close(out, expected, msg=name)
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    assert bench.useful_flops(lengths, 4, 16, causal) == 4 * 4 * 16 * pairs


@pytest.mark.parametrize(
    "intervals, expected",
    [
        ([(0, 10)], 1.0),
        ([(0, 4), (6, 10)], 0.8),  # a gap of 2 in a span of 10
        ([(0, 6), (2, 4), (5, 8), (9, 10)], 0.9),  # nested and overlapping kernels count once
        ([(5, 10), (0, 2)], 0.7),  # in any order
        ([], 0.0),
    ],
)
def test_the_busy_fraction_is_the_union_of_kernels_over_their_span(intervals, expected):
    assert _model_step().busy_fraction(intervals) == pytest.approx(expected)


def test_the_cuda_graph_rows_pad_with_a_segment_no_loss_sees():
    """``ours+compile+graphs``: the row is padded to a multiple of GRAPH_MULTIPLE tokens and the padding's labels are
    ignored, so the patched model's loss on it is the unpadded row's (compilation, CUDA-only in effect, left out)."""
    import qwenvl
    from qwenvl.fixtures import tiny_model
    from qwenvl.verify.batches import SampleSpec, make_sample

    model_step = _model_step()
    model = tiny_model("qwen2_5_vl", seed=1)
    gen = torch.Generator().manual_seed(0)
    samples = [make_sample(model.config, SampleSpec(text=t, image=i), generator=gen) for t, i in [(20, (4, 4)), (30, None)]]
    _, graph_row = model_step.method_inputs(model, "ours+compile+graphs", samples)
    padded = model_step.packed_inputs(model, samples, "upstream", pad_to_multiple_of=model_step.GRAPH_MULTIPLE)
    assert graph_row["input_ids"].shape[-1] == model_step.GRAPH_MULTIPLE
    assert torch.equal(graph_row["input_ids"], padded["input_ids"]) and torch.equal(graph_row["labels"], padded["labels"])
    with qwenvl.patch(model):
        expected = model(**model_step.packed_inputs(model, samples, "upstream"), use_cache=False).loss
        loss = model(**padded, use_cache=False).loss
    torch.testing.assert_close(loss, expected)


def test_the_step_benchmark_builds_every_method_it_accepts():
    """``--methods`` takes model_step.METHODS; each (but the upstream row, run by upstream_step.py) has its patch
    and its batch, and the patched ones without compilation give ``ours``'s loss on the CPU."""
    from qwenvl.fixtures import tiny_model
    from qwenvl.verify.batches import SampleSpec, make_sample

    model_step = _model_step()
    model = tiny_model("qwen2_5_vl", seed=1)
    gen = torch.Generator().manual_seed(0)
    samples = [make_sample(model.config, SampleSpec(text=t, image=i), generator=gen) for t, i in [(20, (4, 4)), (30, None)]]
    losses = {}
    for method in model_step.METHODS:
        if method == model_step.UPSTREAM:
            continue
        ctx, inputs = model_step.method_inputs(model, method, samples)  # a patch is applied here, undone on exit
        with ctx:
            if method in ("ours", "ours+fusedce", "ours-nohost"):
                losses[method] = model(**inputs, use_cache=False).loss
    torch.testing.assert_close(losses["ours+fusedce"], losses["ours"])
    torch.testing.assert_close(losses["ours-nohost"], losses["ours"])


def test_the_distributed_benchmark_runs_on_gloo_and_times_each_rank(tmp_path):
    """``benchmarks/distributed.py --tiny``: one process against DDP over two (gloo), the same global batch. DDP's
    losses are the single process's bit for bit (two micro-batches summed in either order), and every rank's
    timeline accounts for its steps, with the ranks' tokens adding up to the single process's."""
    out = tmp_path / "d.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/distributed.py"), "--tiny", "--runs", "one", "ddp", "--steps", "3",
           "--warmup", "1", "--workdir", str(tmp_path), "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    runs = json.loads(out.read_text())["runs"]
    one, ddp = runs["one"], runs["ddp"]
    assert ddp["losses"] == one["losses"] and len(one["losses"]) == 3
    assert [len(t) for t in one["timeline_per_rank"]] == [3] and [len(t) for t in ddp["timeline_per_rank"]] == [3, 3]
    for step, single in enumerate(one["timeline_per_rank"][0]):
        ranks = [t[step] for t in ddp["timeline_per_rank"]]
        assert sum(r["tokens"] for r in ranks) == single["tokens"] > 0
        assert sum(r["images"] for r in ranks) == single["images"] > 0
        for row in (single, *ranks):
            assert 0 < row["compute_ms"] < row["step_ms"] and row["wait_ms"] >= 0 and row["optimizer_ms"] >= 0
    assert "where a step's time goes" in done.stdout


def test_the_distributed_benchmark_estimates_the_ranks_balance():
    """``--balance``: the packing's split of tokens and of estimated compute between the ranks, with the scaling
    bound imbalance alone leaves (tokens are balanced by the packer; compute, where images weigh more, less so)."""
    cmd = [sys.executable, str(ROOT / "benchmarks/distributed.py"), "--balance", "--tiny", "--steps", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = dict(re.findall(r"^(tokens|compute)\s+([\d.]+)", done.stdout, re.M))
    weight = float(re.search(r"a vision token costs ([\d.]+) text tokens", done.stdout).group(1))
    assert weight > 1 and 1 <= float(rows["tokens"]) <= float(rows["compute"]) < 1.5, done.stdout


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_omni_moe_thinker"])
def test_the_flop_model_counts_every_parameter_once_where_a_token_meets_it(family, tied):
    """``qwenvl.flops``: text + vision + the token embedding + further towers are every parameter, once; the output
    head's matmul counts as vocab x hidden whether or not it is tied to the embedding (tied, it is no parameter of its
    own); the benchmarks' FLOPs and a vision token's cost follow from the counts."""
    from qwenvl.families import FAMILIES
    from qwenvl.fixtures import tiny_model
    from qwenvl.flops import matmul_parameters

    model = tiny_model(family, seed=0)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    counts = matmul_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    others = sum(p.numel() for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in FAMILIES[family].other_towers for p in m.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert counts.text + counts.vision + embedding + others + (0 if tied else counts.lm_head) == total
    text = model.config.get_text_config()
    assert counts.lm_head == text.vocab_size * text.hidden_size and counts.vision > 0 and (others > 0) == (family == "qwen3_omni_moe_thinker")
    assert counts.training_flops(10, 8) == 6 * (counts.text + counts.lm_head) * 10 + 6 * counts.vision * 8
    assert counts.vision_token_cost(4) == pytest.approx(1 + 4 * counts.vision / (counts.text + counts.lm_head))



# --- every benchmark and verify command written down (GPU scripts, noxfile, docs) parses -----------------------
# A typo in a GPU script's arguments costs a device call; here it costs a CPU test. Each benchmark's
# ``parse_args(argv)`` holds every check that needs no GPU.

_SHELL_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")
_COMMAND = re.compile(r"(?:^|[\s;(])(?:python3?\s+(benchmarks/\w+\.py)|qwenvl\s+(verify))(?=\s|$)(.*)")
_PLACEHOLDERS = {"NAME": "qwen2_vl"}  # what the docs write for "a family's name"
_STOP = {"|", "||", "&&", ";", ">", ">>", "2>&1", "2>", "&"}


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """A shell script's lines, or a Markdown file's code (fenced, indented 4 spaces after a blank line, or an
    inline span: a span's ``[optional part]`` is taken as given), each with its first line's number; backslash
    continuations joined."""
    lines = list(enumerate(path.read_text().splitlines(), 1))
    if path.suffix == ".md":
        code, fenced, indented = [], False, False
        for i, (n, line) in enumerate(lines):
            if line.startswith("```"):
                fenced = not fenced
                continue
            indented = line.startswith("    ") and (indented or i == 0 or not lines[i - 1][1].strip())
            if fenced or indented:
                code.append((n, line))
            else:
                code += [(n, span.replace("[", "").replace("]", "")) for span in re.findall(r"`([^`]+)`", line)]
        lines = code
    joined, pending = [], None
    for n, line in lines:
        start, text = pending or (n, "")
        if line.rstrip().endswith("\\"):
            pending = (start, text + line.rstrip()[:-1] + " ")
        else:
            joined.append((start, text + line))
            pending = None
    return joined


def _written_commands() -> list[tuple[str, str, list[str]]]:
    """(where, program, argv) for each ``python benchmarks/X.py ...`` and ``qwenvl verify ...`` written in
    scripts/*.sh, README.md and docs/*.md, shell defaults (``${N:-d}``) expanded, ``$OUT`` read as ``out`` and a
    placeholder as an example of its kind."""
    import shlex

    found = []
    for path in [*sorted((ROOT / "scripts").glob("*.sh")), ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in _code_lines(path):
            if line.lstrip().startswith("#"):
                continue
            line = _SHELL_DEFAULT.sub(lambda m: m.group(2), line).replace("$OUT", "out")
            line = re.sub(r"\b[A-Z]{3,}\b", lambda m: _PLACEHOLDERS.get(m.group(0), m.group(0)), line)
            for match in _COMMAND.finditer(line):
                words = []
                for word in shlex.split(match.group(3), comments=True):
                    if word in _STOP or word.startswith((">", "2>")):
                        break
                    words.append(word)
                found.append((f"{path.relative_to(ROOT)}:{n}", match.group(1) or "qwenvl verify", words))
    return found


def _nox_step_commands() -> list[tuple[str, str, list[str]]]:
    """The runs of ``nox -s bench-step``, from noxfile.py's STEP_SETS and STEP_METHODS (read, not imported: CI's
    test environment has no nox)."""
    import ast

    tree = ast.parse((ROOT / "noxfile.py").read_text())
    values = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and t.id in ("STEP_SETS", "STEP_METHODS")}
    return [(f"noxfile.py bench-step {name}", "benchmarks/model_step.py",
             [*args, "--mixes", "images-12x448", "mixed", "--methods", *values["STEP_METHODS"], "--out", "o.json"])
            for name, args in values["STEP_SETS"].items()]


_COMMANDS = _written_commands() + _nox_step_commands()


def test_the_gpu_scripts_and_docs_hold_commands_to_check():
    """The extraction finds what it is meant to: each GPU script's benchmark runs, and verify's."""
    programs = {(where.split(":")[0].split(" ")[0], program) for where, program, _ in _COMMANDS}
    for expected in [("scripts/gpu_first.sh", "benchmarks/model_step.py"), ("scripts/gpu_first.sh", "benchmarks/attention_bench.py"),
                     ("scripts/gpu_first.sh", "qwenvl verify"), ("scripts/gpu_fla.sh", "benchmarks/fla_shapes.py"),
                     ("scripts/gpu_fla.sh", "qwenvl verify"), ("docs/benchmarks.md", "benchmarks/model_step.py"),
                     ("noxfile.py", "benchmarks/model_step.py")]:
        assert expected in programs, (expected, sorted(programs))


@pytest.mark.parametrize("where, program, argv", _COMMANDS, ids=[c[0] for c in _COMMANDS])
def test_every_written_command_parses(where, program, argv, capsys):
    """Parsed by the program's own parser and its device-free checks: an unknown method, model, mix or flag,
    or a bad combination, fails here rather than on the GPU."""
    try:
        if program == "qwenvl verify":
            from qwenvl.cli import _parser

            args = _parser().parse_args(["verify", *argv])
        else:
            args = _benchmark(Path(program).stem).parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: {program} {' '.join(argv)}\n  exit {exit_.code}: {capsys.readouterr().err.strip()}")
    assert args is not None
