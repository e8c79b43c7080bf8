"""One training step (forward + backward) of image-bearing Qwen-VL models on CUDA: tokens/s, peak memory, MFU.

Models are built from configs with random weights in bf16: the real vision towers of Qwen2.5-VL-3B (32 blocks,
width 1280, window attention) and Qwen3-VL-4B (24 blocks, width 1024, deepstack), a text stack of the real
width with fewer layers (``--text-layers``), and a Qwen3.5-shaped hybrid text model (3 Gated DeltaNet layers per
attention layer) for the packed-vs-padded comparison. Every method runs the same batches in the same process:

    ours                  qwenvl.patch(model), packed row from the collator with its host metadata
                          (PackedCollator.for_model: the vision tower's inputs and every boundary from the host)
    ours-nohost           the same row without the host metadata (a user's own collator: the one-sync fallback)
    ours+fusedce          qwenvl.patch(model, fused_cross_entropy=True): the chunked loss, no logits
    ours+compile          qwenvl.patch(model, compile=True): regional compilation
    ours+compile+fusedce  ... and fused_cross_entropy=True
    ours+compile+graphs   regional compilation with the text layers as CUDA graphs (torch.compile's
                          "reduce-overhead"; the vision regions as ours+compile), the row padded to a multiple of
                          GRAPH_MULTIPLE tokens with a masked segment: one text shape per budget (issue 19's question
                          whether CUDA graphs win; the same row each step, so their best case)
    native-packed         unpatched transformers, 4-row positions (its own packed path; sdpa)
    padded                unpatched transformers, one sample per row padded to the longest (sdpa)
    upstream-4.57         upstream's trainer.py patch on transformers 4.57.6, in its own process on the same
                          batches saved to disk (upstream_step.py: --upstream-site, --upstream-checkout)

A batch mixes images of several sizes, a video and text-only samples (``MIXES``). Reported: median step time
after warm-up, tokens/s (text-model tokens), peak memory, MFU against the GPU's dense bf16 peak, and host syncs per
step (``torch.cuda.set_sync_debug_mode``), each with the Python line that made it (the JSON's ``sync_sites``), and
the GPU's busy fraction in one profiled step (``busy_fraction``: 100% minus what CUDA graphs could win back). The
batch is moved to the GPU in every step as a trainer moves it (``qwenvl.data.to_device``: pinned, non_blocking).

MFU's FLOPs: 6 x (text parameters but the embedding) x text tokens + 6 x vocab x hidden x text tokens (the lm_head's
matmul, counted whether or not it is tied to the embedding) + 6 x vision parameters x patches + attention
(3 x 4 x causal pairs x heads x head_dim per full-attention layer; the vision tower's windows and frames not
counted). Usage::

    python benchmarks/model_step.py --out step.json [--models qwen2_5_vl qwen3_vl qwen3_5] [--methods ...]
    python benchmarks/model_step.py --text-layers 0 ...     # full depth (the real models' layer counts)
    python benchmarks/model_step.py --text-layers 0 --checkpointing --models qwen2_5_vl_7b qwen3_vl_8b ...
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
import gc
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12}
UPSTREAM = "upstream-4.57"  # run by upstream_step.py in its own process, on transformers 4.57.6
# qwenvl.patch's options per method (the other methods are their own branch of method_inputs)
PATCHED = {
    "ours": {},
    "ours+fusedce": {"fused_cross_entropy": True},
    "ours+compile": {"compile": True},
    "ours+compile+fusedce": {"compile": True, "fused_cross_entropy": True},
}
METHODS = (*PATCHED, "ours+compile+graphs", "ours-nohost", "native-packed", "padded", UPSTREAM)
GRAPH_MULTIPLE = 2048  # ours+compile+graphs: rows padded to a multiple of this many tokens

VOCAB = 151_936
QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
QWEN2_5_TOWER = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
QWEN3_TOWER = dict(num_heads=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)
QWEN2_5_ROPE = dict(rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6)
QWEN3_ROPE = dict(rope_theta=5e6, rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True})
CONFIGS = {
    "qwen2_5_vl": dict(
        family="qwen2_5_vl",
        full_layers=36,  # Qwen2.5-VL-3B
        text=dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=32768, tie_word_embeddings=True, **QWEN2_5_ROPE),
        vision=dict(QWEN2_5_TOWER, out_hidden_size=2048),
        tokens=QWEN_TOKENS,
    ),
    "qwen3_vl": dict(
        family="qwen3_vl",
        full_layers=36,  # Qwen3-VL-4B
        text=dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  vocab_size=VOCAB, max_position_embeddings=32768, tie_word_embeddings=True, **QWEN3_ROPE),
        vision=dict(QWEN3_TOWER, depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560,
                    deepstack_visual_indexes=[5, 11, 17]),
        tokens=QWEN_TOKENS,
    ),
    "qwen2_5_vl_7b": dict(
        family="qwen2_5_vl",
        full_layers=28,  # Qwen2.5-VL-7B: the 3B's tower, a wider text model, lm_head untied (8.29B parameters)
        text=dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152_064, max_position_embeddings=32768, tie_word_embeddings=False, **QWEN2_5_ROPE),
        vision=dict(QWEN2_5_TOWER, out_hidden_size=3584),
        tokens=QWEN_TOKENS,
    ),
    "qwen3_vl_8b": dict(
        family="qwen3_vl",
        full_layers=36,  # Qwen3-VL-8B: a 27-block tower of width 1152, lm_head untied (8.77B parameters)
        text=dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  vocab_size=VOCAB, max_position_embeddings=32768, tie_word_embeddings=False, **QWEN3_ROPE),
        vision=dict(QWEN3_TOWER, depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                    deepstack_visual_indexes=[8, 16, 24]),
        tokens=QWEN_TOKENS,
    ),
    "qwen3_5": dict(
        family="qwen3_5",
        full_layers=24,  # this width's full-depth shape here (3 Gated DeltaNet layers per attention layer)
        text=dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                  linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                  linear_conv_kernel_dim=4, vocab_size=248_320, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                   "mrope_section": [11, 11, 10], "mrope_interleaved": True},
                  tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304),
        tokens=dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054),
    ),
}

# Each sample: (text tokens, image (h, w) in patches or None, video (t, h, w) or None). Patches of 14/16 px:
# 32x32 patches ~ a 448x448 (14 px) image, 72x72 ~ 1008x1008; the video is 8 frames of 224x224 (4 temporal groups).
MIXES = {
    "images-12x448": [(600, (32, 32), None)] * 12 + [(1000, None, None)] * 1,
    "mixed": [(300, (32, 32), None), (500, (16, 24), None), (200, (72, 72), None), (400, None, (4, 16, 16)),
              (1500, None, None), (900, None, None), (700, (24, 32), None), (350, (16, 16), None), (1200, None, None)],
    "text-8k": [(n, None, None) for n in (2100, 1300, 900, 1700, 600, 1592)],
}


def model_config(name: str, text_layers: int) -> dict:
    """What ``build`` makes the model from: its config and entry class names and the config's arguments (plain data,
    saved with the batches for ``upstream_step.py``, which builds the same model on transformers 4.57.6)."""
    from qwenvl.families import get_family

    cfg = CONFIGS[name]
    spec = get_family(cfg["family"])
    text = dict(cfg["text"], num_hidden_layers=text_layers or cfg["full_layers"])
    text_layers = text["num_hidden_layers"]
    if name == "qwen3_5":
        text["layer_types"] = ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(text_layers)]
    return {"config_class": spec.config_class, "entry_class": spec.entry_classes[0],
            "kwargs": dict(text_config=text, vision_config=cfg["vision"], **cfg["tokens"])}


def build_from(saved: dict):
    """``model_config``'s model with random weights, bf16, on CUDA, sdpa, in training mode."""
    import transformers

    config = getattr(transformers, saved["config_class"])(**saved["kwargs"])
    with torch.device("cuda"):
        model = getattr(transformers, saved["entry_class"])._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.train()
    return model


def build(name: str, text_layers: int, *, checkpointing: bool = False):
    model = build_from(model_config(name, text_layers))
    if checkpointing:  # each decoder layer and vision block recomputed in the backward (transformers' own)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def samples_for(model, mix: str, seed: int = 0):
    from qwenvl.verify.batches import SampleSpec, make_sample

    gen = torch.Generator().manual_seed(seed)
    return [make_sample(model.config, SampleSpec(text=t, image=img, video=vid), generator=gen) for t, img, vid in MIXES[mix]]


def _labels(ids):
    return ids.clone()


def packed_inputs(model, samples, convention, *, host=True, pad_to_multiple_of=None):
    """The collator's packed row on the host (moved per step by ``to_device``), labels included (the padding's
    ignored)."""
    from qwenvl.verify.batches import pack

    batch = pack(model, samples).with_pixels(torch.bfloat16)
    inputs = batch.model_inputs(convention, host=host, pad_to_multiple_of=pad_to_multiple_of)
    pad = inputs["input_ids"].shape[-1] - batch.labels.shape[-1]
    inputs["labels"] = torch.nn.functional.pad(batch.labels, (0, pad), value=-100)
    _add_token_types(model, inputs)
    return inputs


def padded_inputs(model, samples):
    """The same samples as the ordinary padded batch an unpatched model takes (``PaddedCollator``)."""
    from qwenvl.data import PaddedCollator
    from qwenvl.verify.batches import pack

    batch = PaddedCollator(pad_token_id=0)(pack(model, samples).items)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.items()}
    _add_token_types(model, inputs)
    return inputs


def _add_token_types(model, inputs):
    import inspect

    from qwenvl.positions import mm_token_type_ids

    if "mm_token_type_ids" in inspect.signature(type(model).forward).parameters:
        inputs["mm_token_type_ids"] = mm_token_type_ids(model.config, inputs["input_ids"])


def flops_per_step(model, samples) -> float:
    """The module docstring's formula (its matmul part: ``qwenvl.flops``)."""
    from qwenvl.flops import matmul_parameters

    tokens = sum(len(s) for s in samples)
    patches = sum(int(g.prod(-1).sum()) for s in samples for g in (s.image_grid_thw, s.video_grid_thw) if g is not None)
    cfg = model.config.text_config
    attn_layers = sum(1 for t in getattr(cfg, "layer_types", ["full_attention"] * cfg.num_hidden_layers) if t == "full_attention")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    causal_pairs = sum(len(s) * (len(s) + 1) / 2 for s in samples)
    attn = 3 * 4 * causal_pairs * cfg.num_attention_heads * head_dim * attn_layers
    return matmul_parameters(model).training_flops(tokens, patches) + attn


def method_inputs(model, method, samples):
    """``method``'s patch (a context manager) and its batch, on the host."""
    import qwenvl

    if method in PATCHED:
        ctx = qwenvl.patch(model, **PATCHED[method])
        inputs = packed_inputs(model, samples, "upstream")
    elif method == "ours+compile+graphs":
        ctx = _graphs_patch(model)
        inputs = packed_inputs(model, samples, "upstream", pad_to_multiple_of=GRAPH_MULTIPLE)
    elif method == "ours-nohost":
        ctx, inputs = qwenvl.patch(model), packed_inputs(model, samples, "upstream", host=False)
    elif method == "native-packed":
        ctx, inputs = contextlib.nullcontext(), packed_inputs(model, samples, "hf_positions", host=False)
    elif method == "padded":
        ctx, inputs = contextlib.nullcontext(), padded_inputs(model, samples)
    else:
        raise ValueError(method)
    return ctx, inputs


@contextlib.contextmanager
def _graphs_patch(model):
    """``qwenvl.patch(model)`` with every region compiled, the text layers in torch.compile's "reduce-overhead" mode
    (CUDA graphs, one per text shape), the vision tower's regions in the default mode (their patch counts vary)."""
    import qwenvl
    from qwenvl.families import family_of_model
    from qwenvl.patches._compile import compile_regions
    from qwenvl.patches._handle import PatchRecorder

    spec = family_of_model(model)
    tower = {id(m) for m in spec.vision_tower_in(model).modules()}
    recorder = PatchRecorder()
    with qwenvl.patch(model):
        compile_regions(model, recorder, spec=spec,
                        mode=lambda region: None if id(region) in tower else "reduce-overhead")
        try:
            yield
        finally:
            recorder.undo()


def run_method(model, method, samples, *, warmup, iters):
    ctx, inputs = method_inputs(model, method, samples)
    return time_steps(model, inputs, ctx, warmup=warmup, iters=iters)


def busy_fraction(intervals) -> float:
    """The share of the span from the first kernel's start to the last one's end in which some kernel runs:
    ``intervals`` are (start, end) pairs. What is left (the GPU waiting on the host: launches, syncs, Python) is
    the most CUDA graphs could win back."""
    intervals = sorted(intervals)
    if not intervals:
        return 0.0
    busy, (cur_start, cur_end) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = max(end for _, end in intervals) - intervals[0][0]
    return busy / span if span > 0 else 1.0


def _profiled_busy(step) -> float:
    """``busy_fraction`` of the CUDA kernels of one ``step()`` under torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # CUDA activity only: with CPU tracing on, kineto also reports record_function ranges (torch.compile's
    # "Torch-Compiled Region", ...) as device-side annotations spanning the gaps, and the tracing slows the host.
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [
        e for e in prof.events()
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start and not getattr(e, "is_user_annotation", False)
    ]
    return busy_fraction([(e.time_range.start, e.time_range.end) for e in kernels])


def time_steps(model, inputs, ctx, *, warmup, iters):
    """Median seconds of a forward + backward step on ``inputs`` (host tensors) under ``ctx``, the peak GiB, the
    host syncs of one untimed step after the warm-up (each the line that made it) and the GPU's busy fraction in
    one more, profiled (``busy_fraction``). ``upstream_step.py`` uses it too."""
    from qwenvl.data import to_device
    from qwenvl.host_syncs import recording_host_syncs

    # Pinned once, as the DataLoader's pinning thread does off the step; each step copies without waiting.
    inputs = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    times, sites = [], None
    torch.cuda.reset_peak_memory_stats()
    with ctx:
        for i in range(warmup + iters):
            model.zero_grad(set_to_none=True)
            torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph rows (ours+compile+graphs)
            torch.cuda.synchronize()
            if i == warmup:  # one step under the sync detector (not timed itself)
                with recording_host_syncs() as sites:
                    model(**to_device(inputs, "cuda"), use_cache=False).loss.backward()
                torch.cuda.synchronize()
                continue
            start = time.perf_counter()
            model(**to_device(inputs, "cuda"), use_cache=False).loss.backward()
            torch.cuda.synchronize()
            if i > warmup:
                times.append(time.perf_counter() - start)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        model.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        torch.cuda.synchronize()
        busy = _profiled_busy(lambda: model(**to_device(inputs, "cuda"), use_cache=False).loss.backward())
    model.zero_grad(set_to_none=True)
    return statistics.median(times), peak_gib, sites, busy


def save_batch(folder, name, mix, model, samples, text_layers, *, tokens, flops) -> None:
    """``folder/<model>--<mix>.pt``: the packed row upstream's patch takes (upstream convention, no host metadata,
    labels), the model's ``model_config``, the tokens and FLOPs of the step (``torch.save``; read by upstream_step.py)."""
    inputs = packed_inputs(model, samples, "upstream", host=False)
    inputs.pop("mm_token_type_ids", None)  # a 5.x input: upstream's collator and 4.57's forward have none
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save({"model": name, "mix": mix, "config": model_config(name, text_layers), "inputs": inputs,
                "tokens": tokens, "flops": flops}, Path(folder) / f"{name}--{mix}.pt")


def run_upstream(args, name: str, folder) -> list[dict]:
    """``upstream_step.py``'s rows for ``name``'s saved batches: its own process, ``--upstream-site`` (transformers
    4.57.6) first on ``PYTHONPATH``; its stderr goes to ours."""
    root = Path(__file__).resolve().parent.parent
    paths = [args.upstream_site, str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    command = [sys.executable, str(Path(__file__).with_name("upstream_step.py")), "--batches", str(folder), "--models", name,
               "--mixes", *args.mixes, "--upstream-checkout", args.upstream_checkout,
               "--warmup", str(args.warmup), "--iters", str(args.iters)]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)}, stdout=subprocess.PIPE, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not rows:
        why = f"upstream_step.py exited {done.returncode}: {done.stdout[-300:]}"
        return [{"model": name, "mix": mix, "method": UPSTREAM, "error": why} for mix in args.mixes]
    return rows


def _print_row(row: dict) -> None:
    name, mix, method = row["model"], row["mix"], row["method"]
    if "error" in row:
        print(f"{name:<11} {mix:<14} {method:<21} failed: {row['error'][:160]}", flush=True)
        return
    vs = f"{row['speedup_vs_ours']:>6.2f}x" if row.get("speedup_vs_ours") else f"{'-':>7}"
    print(f"{name:<11} {mix:<14} {method:<21} {row['tokens']:>6} {row['ms']:>8.1f} {row['tokens_per_s']:>8.0f} "
          f"{row['peak_gib']:>6.1f} {(row['mfu'] or 0)*100:>4.0f}% {row['host_syncs']:>5} {vs} "
          f"{row.get('gpu_busy', 0)*100:>4.0f}%", flush=True)


def _measure_mix(args, name, mix, model, peak, folder) -> list[dict]:
    """Every in-process method on one batch (saved first when ``folder``); ``speedup_vs_ours`` against the first."""
    samples = samples_for(model, mix)
    tokens = sum(len(s) for s in samples)
    flops = flops_per_step(model, samples)
    if folder:
        save_batch(folder, name, mix, model, samples, args.text_layers, tokens=tokens, flops=flops)
    from torch._dynamo.utils import counters

    rows, base = [], None
    for method in (m for m in args.methods if m != UPSTREAM):
        skips = int(counters["inductor"]["cudagraph_skips"])
        try:
            seconds, gib, sites, busy = run_method(model, method, samples, warmup=args.warmup, iters=args.iters)
        except Exception as exc:  # noqa: BLE001 - a method that cannot run is reported, the rest go on
            rows.append({"model": name, "mix": mix, "method": method, "error": f"{type(exc).__name__}: {exc}"[:500]})
            _print_row(rows[-1])
            torch.cuda.empty_cache()
            continue
        base = base or seconds
        rows.append({"model": name, "mix": mix, "method": method, "tokens": tokens, "ms": seconds * 1e3,
                     "tokens_per_s": tokens / seconds, "peak_gib": gib, "mfu": flops / seconds / peak if peak else None,
                     "host_syncs": len(sites), "sync_sites": dict(Counter(sites)),
                     "speedup_vs_ours": base / seconds, "gpu_busy": busy,
                     # regions torch.compile left out of CUDA graphs (its log says why: TORCH_LOGS=perf_hints)
                     "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]) - skips})
        _print_row(rows[-1])
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["qwen2_5_vl", "qwen3_vl"], choices=list(CONFIGS))
    p.add_argument("--mixes", nargs="+", default=["images-12x448", "mixed"], choices=list(MIXES))
    p.add_argument("--methods", nargs="+", default=["ours", "ours-nohost", "ours+compile", "ours+compile+fusedce", "native-packed", "padded"],
                   choices=METHODS)
    p.add_argument("--text-layers", type=int, default=8, help="text decoder layers; 0: the real model's (full depth)")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing (transformers' gradient_checkpointing_enable): the 7B/8B at full depth on one GPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--out")
    p.add_argument("--save-batches", metavar="DIR", help="write each (model, mix) batch and the model's config there")
    p.add_argument("--upstream-site", metavar="DIR", help=f"{UPSTREAM}: a pip install --target folder with transformers==4.57.6")
    p.add_argument("--upstream-checkout", metavar="DIR", help=f"{UPSTREAM}: the qwen-vl-finetune folder of QwenLM/Qwen3-VL")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, with every check that needs no GPU (one line and exit 2 otherwise)."""
    args = _parser().parse_args(argv)
    if UPSTREAM in args.methods and not (args.upstream_site and args.upstream_checkout):
        print(f"model_step.py: --methods {UPSTREAM} needs --upstream-site DIR (a pip install --target folder holding "
              "transformers==4.57.6) and --upstream-checkout DIR (QwenLM/Qwen3-VL's qwen-vl-finetune folder); "
              "docs/benchmarks.md says how", file=sys.stderr)
        raise SystemExit(2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    rows = []
    print(f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, text layers {args.text_layers}")
    print(f"{'model':<11} {'mix':<14} {'method':<21} {'tokens':>6} {'ms':>8} {'tok/s':>8} {'GiB':>6} {'MFU':>5} {'syncs':>5} {'vs ours':>7} {'busy':>5}")
    with contextlib.ExitStack() as stack:
        folder = args.save_batches or (stack.enter_context(tempfile.TemporaryDirectory()) if UPSTREAM in args.methods else None)
        for name in args.models:
            model = build(name, args.text_layers, checkpointing=args.checkpointing)
            bases = {}
            for mix in args.mixes:
                mix_rows = _measure_mix(args, name, mix, model, peak, folder)
                rows += mix_rows
                bases[mix] = next((r["ms"] for r in mix_rows if "ms" in r), None)  # the first method's
            del model
            gc.collect()
            torch.cuda.empty_cache()
            if UPSTREAM in args.methods:  # after the model is gone: its own process needs the memory
                for row in run_upstream(args, name, folder):
                    if "ms" in row and bases.get(row["mix"]):
                        row["speedup_vs_ours"] = bases[row["mix"]] / row["ms"]
                    rows.append(row)
                    _print_row(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
                       "text_layers": args.text_layers, "checkpointing": args.checkpointing, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
