"""The mutation catalogue: realistic bugs planted one at a time in a scratch copy of the package; each must make
the CPU suite fail.

    nox -s mutations                          # every mutation, then the README table is rewritten
    python scripts/mutations.py --only text_attention_non_causal
    python scripts/mutations.py --list

For each mutation: the checkout's qwenvl/ (its reference/ and fixtures/ inside), parity_tests/, examples/, scripts/ are
copied to a scratch folder, one exact
piece of source text is replaced, and the tests that should catch the bug run against that copy (``python -m
pytest -x`` with the scratch folder first on ``sys.path``; the run checks that ``qwenvl`` was imported from it).
A mutation is *killed* when a test fails, and the first failing test is the one reported; *survived* when every
selected test passes: a hole in the suite, closed by a new test, never by dropping the mutation. A baseline run of
the unmutated copy over the union of the selections must pass first, or nothing is measured.

Each mutation's ``old`` text must occur exactly once in its file (``parity_tests/test_mutations_catalogue.py``
checks that on every CI run, so the catalogue cannot rot when the code moves).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("qwenvl", "parity_tests", "examples", "scripts")
COPIED_FILES = ("pyproject.toml", "setup.py", "README.md")
README_BEGIN = "<!-- mutations:begin (scripts/mutations.py writes this table) -->"
README_END = "<!-- mutations:end -->"

MODELS = "parity_tests/test_models.py"
PACKED_ALONE = f"{MODELS}::test_packed_equals_each_sample_alone"
LINEAR = f"{MODELS}::test_linear_attention_restarts_at_every_sample"
ATTENTION = "parity_tests/test_attention.py::test_backend_matches_reference"
COLLATOR = "parity_tests/test_data_packing.py::test_packed_collator_properties"
HOLES = "parity_tests/test_mutations_catalogue.py"


@dataclass(frozen=True)
class Mutation:
    """One planted bug: ``edits`` are ``(old, new)`` replacements in ``file`` (each ``old`` occurs once)."""

    name: str
    what: str
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]

    def apply(self, source: str) -> str:
        for old, new in self.edits:
            count = source.count(old)
            if count != 1:
                raise ValueError(f"{self.name}: {self.file} holds the text to replace {count} times, not once: {old!r}")
            source = source.replace(old, new)
        return source


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "cu_seqlens_off_by_one",
        "every inner boundary of cu_seqlens one token late",
        "qwenvl/packing.py",
        ((
            "    return torch.cat([zero, lengths_S.to(torch.int32).cumsum(0, dtype=torch.int32)])",
            "    cu = torch.cat([zero, lengths_S.to(torch.int32).cumsum(0, dtype=torch.int32)])\n"
            "    cu[1:-1] += 1\n"
            "    return torch.minimum(cu, cu[-1])",
        ),),
        ("parity_tests/test_packing.py", COLLATOR, PACKED_ALONE),
    ),
    Mutation(
        "segment_merged_into_neighbour",
        "sdpa backend: the first two segments attend as one",
        "qwenvl/attention/_sdpa.py",
        ((
            "    for start, end in zip(meta.offsets[:-1], meta.offsets[1:]):",
            "    bounds = meta.offsets[:1] + meta.offsets[2:] if len(meta.offsets) > 2 else meta.offsets\n"
            "    for start, end in zip(bounds[:-1], bounds[1:]):",
        ),),
        (ATTENTION, PACKED_ALONE),
    ),
    Mutation(
        "text_attention_non_causal",
        "packed text attention runs non-causal",
        "qwenvl/patches/_dispatch.py",
        (('causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),', "causal=False,"),),
        (PACKED_ALONE,),
    ),
    Mutation(
        "vision_attention_causal",
        "the vision tower's varlen attention runs causal",
        "qwenvl/patches/_dispatch.py",
        (("                causal=False,\n", "                causal=True,\n"),),
        (f"{MODELS}::test_vision_tower_runs_on_the_varlen_core", PACKED_ALONE),
    ),
    Mutation(
        "softmax_scale_dropped_in_sdpa",
        "sdpa backend ignores the given softmax scale (uses 1/sqrt(head_dim))",
        "qwenvl/attention/_sdpa.py",
        (("            scale=scale,\n", "            scale=None,\n"),),
        (ATTENTION,),
    ),
    Mutation(
        "kv_heads_repeat_not_interleave",
        "sdpa backend expands kv heads with repeat instead of repeat_interleave",
        "qwenvl/attention/_sdpa.py",
        ((
            "    gqa = q_TNH.shape[1] != k_TKH.shape[1]\n",
            "    if q_TNH.shape[1] != k_TKH.shape[1]:\n"
            "        group = q_TNH.shape[1] // k_TKH.shape[1]\n"
            "        k_TKH, v_TKH = k_TKH.repeat(1, group, 1), v_TKH.repeat(1, group, 1)\n"
            "    gqa = False\n",
        ),),
        (ATTENTION, PACKED_ALONE),
    ),
    Mutation(
        "linear_heads_repeat_not_interleave",
        "Gated DeltaNet glue expands q/k heads with repeat instead of repeat_interleave",
        "qwenvl/patches/_linear.py",
        ((
            "        query = query.repeat_interleave(groups, dim=2)\n        key = key.repeat_interleave(groups, dim=2)",
            "        query = query.repeat(1, 1, groups, 1)\n        key = key.repeat(1, 1, groups, 1)",
        ),),
        (LINEAR,),
    ),
    Mutation(
        "sliding_window_off_by_one",
        "a sliding window of w keys becomes w + 1",
        "qwenvl/patches/_dispatch.py",
        (("window=(sliding - 1, -1) if sliding else (-1, -1),", "window=(sliding, -1) if sliding else (-1, -1),"),),
        (f"{MODELS}::test_sliding_window_layers_are_honoured",),
    ),
    Mutation(
        "sliding_window_ignored",
        "packed sliding-window layers attend to the whole sample",
        "qwenvl/patches/_dispatch.py",
        (("window=(sliding - 1, -1) if sliding else (-1, -1),", "window=(-1, -1),"),),
        (f"{MODELS}::test_sliding_window_layers_are_honoured",),
    ),
    Mutation(
        "max_seqlen_from_first_segment",
        "VarlenMeta.max_seqlen is the first segment's length",
        "qwenvl/packing.py",
        (("max_seqlen=max(lengths, default=0),", "max_seqlen=lengths[0] if lengths else 0,"),),
        ("parity_tests/test_packing.py",),
    ),
    Mutation(
        "dropout_ignored_in_training",
        "packed text attention drops its dropout probability",
        "qwenvl/patches/_dispatch.py",
        ((
            'dropout=float(kwargs.get("dropout") or 0.0),\n                window=(sliding',
            "dropout=0.0,\n                window=(sliding",
        ),),
        (f"{MODELS}::test_dropout_is_honoured_in_training",),
    ),
    Mutation(
        "vision_window_cu_seqlens_reused",
        "the vision metadata cache keys on the token count: Qwen2.5-VL's full blocks reuse the window cu_seqlens",
        "qwenvl/patches/_dispatch.py",
        (("            if cached is cu_seqlens:", "            if int(cached[-1]) == int(cu_seqlens[-1]):"),),
        (f"{PACKED_ALONE}[qwen2_5_vl]", "parity_tests/test_golden.py::test_installed_release_matches_the_goldens"),
    ),
    Mutation(
        "revert_misses_one_target",
        "PatchRecorder.undo forgets the last recorded target",
        "qwenvl/patches/_handle.py",
        ((
            "        while self._undo:\n            self._undo.pop()()",
            "        if self._undo:\n            self._undo.pop()\n        while self._undo:\n            self._undo.pop()()",
        ),),
        (f"{MODELS}::test_patch_and_revert_by_identity",),
    ),
    Mutation(
        "padding_mask_treated_as_packed",
        "any non-float attention mask is taken for cu_seqlens",
        "qwenvl/patches/_entry.py",
        ((
            "is_cu_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 1",
            "is_cu_mask = isinstance(attention_mask, torch.Tensor) and not attention_mask.dtype.is_floating_point",
        ),),
        (f"{MODELS}::test_padded_batches_unchanged_by_the_patch", "parity_tests/test_ordinary_calls.py"),
    ),
    Mutation(
        "moe_router_loss_drops_padding_mask",
        "the MoE router loss ignores the padding mask of ordinary batches too",
        "qwenvl/patches/_dispatch.py",
        (
            ('        if isinstance(kwargs.get("attention_mask"), VarlenMeta):\n', '        if "attention_mask" in kwargs:\n'),
            (
                "        if len(args) > mask_index and isinstance(args[mask_index], VarlenMeta):",
                "        if len(args) > mask_index:",
            ),
        ),
        ("parity_tests/test_ordinary_calls.py::test_moe_router_aux_loss_of_padded_batches_is_unchanged",),
    ),
    Mutation(
        "vision_lr_needs_projector_lr",
        "vision_tower_lr ignored unless mm_projector_lr is set (the upstream trainer's bug)",
        "qwenvl/train/optim.py",
        ((
            '        "vision": lr if vision_tower_lr is None else vision_tower_lr,',
            '        "vision": lr if vision_tower_lr is None or mm_projector_lr is None else vision_tower_lr,',
        ),),
        ("parity_tests/test_optimizer_groups.py",),
    ),
    Mutation(
        "bias_gets_weight_decay",
        "a bias in the decay names decays",
        "qwenvl/train/optim.py",
        (('        decay = name in decay_names and not name.endswith("bias")', "        decay = name in decay_names"),),
        ("parity_tests/test_optimizer_groups.py",),
    ),
    Mutation(
        "projector_classed_as_vision",
        "Qwen3-VL's deepstack mergers classed as vision tower",
        "qwenvl/train/optim.py",
        (("        for attribute in (*attributes, deepstack):", "        for attribute in attributes:"),),
        ("parity_tests/test_optimizer_groups.py",),
    ),
    Mutation(
        "labels_cross_sample_boundary",
        "the packed collator keeps each sample's first label (the previous sample predicts it)",
        "qwenvl/data/collators.py",
        ((
            '        labels_T = mask_boundary_labels(torch.cat([s["labels"] for s in samples]), cu_seqlens, IGNORE_INDEX)',
            '        labels_T = torch.cat([s["labels"] for s in samples])',
        ),),
        (COLLATOR,),
    ),
    Mutation(
        "collator_mrope_not_restarting",
        "the packed collator continues each sample's mrope positions from the previous sample's end",
        "qwenvl/data/collators.py",
        ((
            '        positions_3T = torch.cat([s["position_ids"] for s in samples], dim=-1)',
            '        positions_3T = torch.cat([s["position_ids"] + sum(p["input_ids"].numel() for p in samples[:i])'
            " for i, s in enumerate(samples)], dim=-1)",
        ),),
        (COLLATOR,),
    ),
    Mutation(
        "packed_position_ids_not_restarting",
        "qwenvl.positions.packed_position_ids continues positions across samples",
        "qwenvl/positions.py",
        ((
            "    return torch.cat(rows, dim=-1)[:, None, :]",
            "    starts = [0]\n"
            "    for r in rows[:-1]:\n"
            "        starts.append(starts[-1] + int(r.max()) + 1)\n"
            "    return torch.cat([r + s for r, s in zip(rows, starts)], dim=-1)[:, None, :]",
        ),),
        (
            f"{MODELS}::test_qwen2_5_video_seconds_per_grid_reach_the_packed_positions",
            f"{HOLES}::test_packed_position_ids_restart_at_every_sample",
        ),
    ),
    Mutation(
        "text_positions_not_restarting",
        "cu_seqlens_to_position_ids counts through the whole row",
        "qwenvl/packing.py",
        (
            (
                "    return torch.arange(seg.numel(), device=seg.device) - starts[seg]",
                "    return torch.arange(seg.numel(), device=seg.device)",
            ),
        ),
        ("parity_tests/test_packing.py", COLLATOR),
    ),
    Mutation(
        "linear_conv_across_samples_torch",
        "'torch' linear backend: the short causal conv runs over the whole row",
        "qwenvl/patches/_linear.py",
        ((
            "        for start, end in self._segments(meta):\n            seg = F.conv1d(",
            "        for start, end in [(0, meta.total)]:\n            seg = F.conv1d(",
        ),),
        (LINEAR,),
    ),
    Mutation(
        "linear_state_across_samples_torch",
        "'torch' linear backend: the delta-rule state runs over the whole row",
        "qwenvl/patches/_linear.py",
        ((
            "        for start, end in self._segments(meta):\n            out, _ = self._rule(",
            "        for start, end in [(0, meta.total)]:\n            out, _ = self._rule(",
        ),),
        (LINEAR,),
    ),
    Mutation(
        "linear_segments_whole_row",
        "'segments' linear backend: the original layer runs once over the whole row",
        "qwenvl/patches/_linear.py",
        ((
            "        for start, end in zip(meta.offsets[:-1], meta.offsets[1:])\n        if end > start",
            "        for start, end in [(0, meta.total)]\n        if end > start",
        ),),
        (LINEAR, "parity_tests/test_golden.py::test_installed_release_matches_the_goldens"),
    ),
    Mutation(
        "deepstack_added_in_position_order",
        "deepstack features handed over in the features' order (images, then videos) added at ascending positions",
        "qwenvl/patches/_visual.py",
        ((
            "        index = state.modality_index if state.deepstack_handed else state.visual_index",
            "        index = state.visual_index",
        ),),
        ("parity_tests/test_host_meta.py::test_precomputed_vision_inputs_are_the_towers_own",),
    ),
    Mutation(
        "tf32_rounding_truncates",
        "the 3xTF32 yardstick's TF32 rounding truncates instead of rounding to nearest",
        "qwenvl/reference/attention.py",
        (("    return ((bits + 0x1000) & -0x2000).view(torch.float32)", "    return (bits & -0x2000).view(torch.float32)"),),
        ("parity_tests/test_attention.py::test_tf32_rounding_is_to_nearest_ties_away",),
    ),
    Mutation(
        "compiled_tower_reads_boundaries_back",
        "compiled vision blocks never get the collator's boundaries: a host sync per cu_seqlens",
        "qwenvl/patches/_dispatch.py",
        ((
            "        if host_offsets is not None:  # compiled vision blocks read their boundaries from there, no sync",
            "        if False:  # compiled vision blocks read their boundaries from there, no sync",
        ),),
        ("parity_tests/test_compile.py::test_compiled_vision_blocks_take_the_collators_boundaries",),
    ),
    Mutation(
        "fused_loss_gradient_unscaled",
        "the chunked loss's gradients are not divided by the labelled tokens (or num_items_in_batch)",
        "qwenvl/patches/_loss.py",
        (
            ("                keep_C = keep_C * inverse", "                pass"),  # bf16 / fp32: divided in the forward
            ("        factor = grad_loss.float() * ctx.inverse", "        factor = grad_loss.float()"),  # fp16
        ),
        ("parity_tests/test_fused_loss.py",),
    ),
    Mutation(
        "fused_loss_weight_grad_first_chunk_only",
        "the chunked loss adds only the first chunk of tokens to the output weight's gradient",
        "qwenvl/patches/_loss.py",
        ((
            "                    grad_weight[row : row + WEIGHT_ROWS] += grad_CV[:, row : row + WEIGHT_ROWS].t() @ x_CD",
            "                    grad_weight[row : row + WEIGHT_ROWS] += grad_CV[:, row : row + WEIGHT_ROWS].t() @ x_CD"
            " if start == 0 else 0",
        ),),
        ("parity_tests/test_fused_loss.py::test_the_chunked_loss_equals_the_unfused_loss_over_many_chunks",),
    ),
    Mutation(
        "fused_loss_divides_after_rounding_in_bf16",
        "the chunked loss rounds its bf16 gradients to the input dtype before dividing them (as fp16 must)",
        "qwenvl/patches/_loss.py",
        (("        divide_first = hidden_TD.dtype != torch.float16", "        divide_first = False"),),
        ("parity_tests/test_models.py::test_float32_weights_under_bf16_autocast",),
    ),
    Mutation(
        "autocast_dtypes_left_mixed",
        "under autocast the attention dispatch hands the varlen core q, k, v as the model made them (fp32 and bf16)",
        "qwenvl/patches/_dispatch.py",
        (("    if dtype is None or q.dtype == k.dtype == v.dtype == dtype:", "    if True:"),),
        ("parity_tests/test_models.py::test_float32_weights_under_bf16_autocast",),
    ),
    Mutation(
        "videos_apart_never_put_in",
        "a row's videos, computed before the forward, never reach their placeholder positions",
        "qwenvl/patches/_visual.py",
        ((
            "                embeds = _put_apart(embeds, index, state.pending[-1][0].pooler_output)",
            "                pass",
        ),),
        ("parity_tests/test_host_meta.py::test_precomputed_vision_inputs_are_the_towers_own",),
    ),
    Mutation(
        "compiled_regions_nested",
        "a listed module holding listed ones (5.25's Omni encoders) compiled whole around its blocks' regions",
        "qwenvl/patches/_compile.py",
        (("        if id(module) in nests:\n            continue\n", ""),),
        ("parity_tests/test_compile.py::test_no_region_holds_another",),
    ),
    Mutation(
        "pinned_router_compiled",
        "qwenvl verify --compile: the MoE routers, pinned to the oracle's choice, traced into the compiled layers",
        "qwenvl/verify/routing.py",
        (("        eager = _routers_eager(blocks)", "        eager = []"),),
        ("parity_tests/test_compile.py::test_compiled_packed_equals_each_sample_alone",),
    ),
    Mutation(
        "regions_share_transformers_code",
        "compiled regions keep transformers' shared code object: a process's third patched family runs eagerly",
        "qwenvl/patches/_compile.py",
        ((
            "        target = original if function is None else types.MethodType(_with_own_code(function), module)",
            "        target = original",
        ),),
        ("parity_tests/test_compile.py::test_a_process_that_patches_again_keeps_compiling",),
    ),
    Mutation(
        "compiled_case_eager_yardstick_only",
        "a compiled verify case judged against the eager yardstick alone: correct fused-loss cases fail by chance",
        "qwenvl/verify/parity.py",
        (("    if compile:  # the compiled way, done plainly", "    if False:  # the compiled way, done plainly"),),
        ("parity_tests/test_compile.py::test_the_fused_loss_of_a_compiled_case_is_judged_against_the_compiled_way_too",),
    ),
    Mutation(
        "compiled_case_runs_eager",
        "a compiled verify case that dynamo ran eagerly (its recompile limit hit) passes, judged on the eager run",
        "qwenvl/verify/parity.py",
        ((
            "    torch._dynamo.reset()\n    before = compile_stats()\n"
            "    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):\n        yield\n",
            "    before = compile_stats()\n    yield\n    return\n",
        ),),
        ("parity_tests/test_compile.py::test_a_compiled_case_that_ran_eagerly_fails",),
    ),
)


def _ignore(folder, names):
    return {n for n in names if n in ("__pycache__", ".hypothesis", ".pytest_cache")}


def make_scratch(dest: Path) -> Path:
    """A copy of the checkout's package (its oracle and fixtures inside), its tests, examples and scripts."""
    for name in COPIED:
        shutil.copytree(ROOT / name, dest / name, ignore=_ignore, symlinks=True)
    for name in COPIED_FILES:
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _env(scratch: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # One intra-op thread: the tiny models gain nothing from more, and the runs share the machine.
    env.update(PYTHONPATH=str(scratch), PYTHONDONTWRITEBYTECODE="1", HYPOTHESIS_PROFILE="ci", OMP_NUM_THREADS="1")
    return env


def check_imports(scratch: Path) -> None:
    code = "import qwenvl, qwenvl.reference, qwenvl.fixtures; print(qwenvl.__file__, qwenvl.reference.__file__, qwenvl.fixtures.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=_env(scratch), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode or len(paths) != 3 or not all(Path(p).is_relative_to(scratch) for p in paths):
        raise SystemExit(f"the scratch copy is not what gets imported: {out.stdout} {out.stderr}")


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")


def run_tests(
    scratch: Path, tests: tuple[str, ...], *, stop_first: bool = True, timeout: int = 1200, extra: tuple[str, ...] = ()
) -> tuple[int, str, str]:
    """(pytest's exit status, the first failing test, the output's tail)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--no-header", "-W", "ignore", *extra]
    if stop_first:
        cmd.append("-x")
    try:
        proc = subprocess.run([*cmd, *tests], cwd=scratch, env=_env(scratch), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "", f"timed out after {timeout} s"
    output = proc.stdout + proc.stderr
    killer = next((m.group(2) for line in output.splitlines() if (m := _FAILED.match(line))), "")
    return proc.returncode, killer, "\n".join(output.splitlines()[-15:])


def run_mutation(mutation: Mutation, *, keep: bool = False, extra: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"qwenvl-mut-{mutation.name}-") as tmp:
        scratch = make_scratch(Path(tmp))
        target = scratch / mutation.file
        target.write_text(mutation.apply(target.read_text()))
        code, killer, tail = run_tests(scratch, mutation.tests, extra=extra)
        if keep:
            shutil.copytree(scratch, ROOT / "build" / "mutations" / mutation.name, dirs_exist_ok=True, symlinks=True)
    if code == 0:
        result = "survived"
    elif code in (1, 2) and killer:
        result = "killed"
    else:
        result = "error"
    return {
        "name": mutation.name,
        "what": mutation.what,
        "file": mutation.file,
        "result": result,
        "killed_by": killer,
        "exit_status": code,
        "seconds": round(time.perf_counter() - start, 1),
        "tail": tail if result != "killed" else "",
    }


def table(results: list[dict]) -> str:
    killed = sum(r["result"] == "killed" for r in results)
    lines = [
        f"**killed {killed} of {len(results)}**",
        "",
        "| # | mutation | what it breaks | file | result | killed by | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        killer = f"`{r['killed_by']}`" if r["killed_by"] else "-"
        lines.append(f"| {i} | `{r['name']}` | {r['what']} | `{r['file']}` | {r['result']} | {killer} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def write_readme(path: Path, text: str, environment: str) -> None:
    readme = path.read_text()
    block = f"{README_BEGIN}\n{environment}\n\n{text}\n{README_END}"
    if README_BEGIN in readme and README_END in readme:
        before, rest = readme.split(README_BEGIN, 1)
        after = rest.split(README_END, 1)[1]
        readme = before + block + after
    else:
        readme = readme.rstrip("\n") + "\n\n## Mutation catalogue\n\n" + block + "\n"
    path.write_text(readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only these mutations (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (it must pass)")
    parser.add_argument("--readme", type=Path, help="rewrite the table between the README markers (full runs only)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep each mutated copy under build/mutations/")
    parser.add_argument(
        "--pytest-arg", action="append", default=[], metavar="ARG",
        help="passed to every pytest run, repeatable (--pytest-arg=-k --pytest-arg='not glm4v': leave out a family "
        "whose own tests do not pass yet; the README line records it)",
    )
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = sorted(set(args.only or ()) - {m.name for m in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutations {unknown}; --list shows them")
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<38} {m.file:<30} {m.what}")
        return 0
    for m in chosen:  # every pattern applies before anything runs
        m.apply((ROOT / m.file).read_text())

    import torch
    import transformers

    extra = tuple(args.pytest_arg)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwenvl-mut-baseline-") as tmp:
        scratch = make_scratch(Path(tmp))
        check_imports(scratch)
        if not args.no_baseline:
            union = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            print(f"baseline: the unmutated copy over {len(union)} test selections ...", flush=True)
            code, killer, tail = run_tests(scratch, union, stop_first=True, extra=extra)
            if code != 0:
                print(f"the unmutated copy fails ({killer or 'exit ' + str(code)}): fix that first\n{tail}", file=sys.stderr)
                return 2
            print(f"baseline passed in {time.perf_counter() - started:.0f} s", flush=True)

    results = []
    for i, m in enumerate(chosen, 1):
        result = run_mutation(m, keep=args.keep, extra=extra)
        results.append(result)
        print(f"[{i}/{len(chosen)}] {m.name}: {result['result']} {result['killed_by']} ({result['seconds']:.0f} s)", flush=True)
        if result["tail"]:
            print("    " + result["tail"].replace("\n", "\n    "), flush=True)
    text = table(results)
    print()
    print(text)
    environment = (
        f"Last run: transformers {transformers.__version__}, torch {torch.__version__}, {len(results)} mutations in "
        f"{(time.perf_counter() - started) / 60:.0f} min on {os.cpu_count()} cores (`nox -s mutations`"
        + (f" with pytest {' '.join(repr(a) if ' ' in a else a for a in extra)}" if extra else "")
        + ")."
    )
    print(environment)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "results": results}, indent=2) + "\n")
    if args.readme and not args.only:
        write_readme(args.readme, text, environment)
        print(f"table written to {args.readme}")
    survived = [r["name"] for r in results if r["result"] != "killed"]
    if survived:
        print(f"not killed: {', '.join(survived)}: close each hole with a test", file=sys.stderr)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
