"""One training step (forward + backward) of image-bearing Qwen-VL models on CUDA: tokens/s, peak memory, MFU.

Models are built from configs with random weights in bf16: the real vision towers of Qwen2.5-VL-3B (32 blocks,
width 1280, window attention) and Qwen3-VL-4B (24 blocks, width 1024, deepstack), a text stack of the real
width with fewer layers (``--text-layers``), and a Qwen3.5-shaped hybrid text model (3 Gated DeltaNet layers per
attention layer) for the packed-vs-padded comparison. Every method runs the same batches in the same process:

    ours                  qwenvl.patch(model), packed row from the collator with its host metadata
                          (PackedCollator.for_model: the vision tower's inputs and every boundary from the host)
    ours-nohost           the same row without the host metadata (a user's own collator: the one-sync fallback)
    ours+fusedce          qwenvl.patch(model, fused_cross_entropy=True): Liger-Kernel's fused loss, no logits
    ours+compile          qwenvl.patch(model, compile=True): regional compilation
    ours+compile+fusedce  ... and fused_cross_entropy=True (Liger-Kernel)
    native-packed         unpatched transformers, 4-row positions (its own packed path; sdpa)
    padded                unpatched transformers, one sample per row padded to the longest (sdpa)

A batch mixes images of several sizes, a video and text-only samples (``MIXES``). Reported: median step time
after warm-up, tokens/s (text-model tokens), peak memory, MFU against the GPU's dense bf16 peak, and host syncs per
step (``torch.cuda.set_sync_debug_mode``), each with the Python line that made it (the JSON's ``sync_sites``). The
batch is moved to the GPU in every step as a trainer moves it (``qwenvl.data.to_device``: pinned, non_blocking).

MFU's FLOPs: 6 x (text parameters but the embedding) x text tokens + 6 x vocab x hidden x text tokens (the lm_head's
matmul, counted whether or not it is tied to the embedding) + 6 x vision parameters x patches + attention
(3 x 4 x causal pairs x heads x head_dim per full-attention layer; the vision tower's windows and frames not
counted). Usage::

    python benchmarks/model_step.py --out step.json [--models qwen2_5_vl qwen3_vl qwen3_5] [--methods ...]
    python benchmarks/model_step.py --text-layers 0 ...     # full depth (the real models' layer counts)
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
import gc
import json
import statistics
import sys
import time
import warnings

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12}

VOCAB = 151_936
CONFIGS = {
    "qwen2_5_vl": dict(
        family="qwen2_5_vl",
        full_layers=36,  # Qwen2.5-VL-3B
        text=dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                  rope_theta=1e6, tie_word_embeddings=True),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        tokens=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653),
    ),
    "qwen3_vl": dict(
        family="qwen3_vl",
        full_layers=36,  # Qwen3-VL-4B
        text=dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=5e6,
                  rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                  tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
        tokens=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653),
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


def build(name: str, text_layers: int):
    import transformers

    from qwenvl.families import get_family

    cfg = CONFIGS[name]
    spec = get_family(cfg["family"])
    text = dict(cfg["text"], num_hidden_layers=text_layers or cfg["full_layers"])
    text_layers = text["num_hidden_layers"]
    if name == "qwen3_5":
        text["layer_types"] = ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(text_layers)]
    config = getattr(transformers, spec.config_class)(text_config=text, vision_config=cfg["vision"], **cfg["tokens"])
    with torch.device("cuda"):
        model = getattr(transformers, spec.entry_classes[0])._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.train()
    return model


def samples_for(model, mix: str, seed: int = 0):
    from qwenvl.verify.batches import SampleSpec, make_sample

    gen = torch.Generator().manual_seed(seed)
    return [make_sample(model.config, SampleSpec(text=t, image=img, video=vid), generator=gen) for t, img, vid in MIXES[mix]]


def _labels(ids):
    return ids.clone()


def packed_inputs(model, samples, convention, *, host=True):
    """The collator's packed row on the host (moved per step by ``to_device``), labels included."""
    from qwenvl.verify.batches import pack

    batch = pack(model, samples).with_pixels(torch.bfloat16)
    inputs = batch.model_inputs(convention, host=host)
    inputs["labels"] = batch.labels
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
    """The module docstring's formula."""
    text_params = sum(p.numel() for n, p in model.named_parameters() if not any(k in n for k in ("visual", "embed_tokens", "lm_head")))
    vision_params = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    tokens = sum(len(s) for s in samples)
    patches = sum(int(g.prod(-1).sum()) for s in samples for g in (s.image_grid_thw, s.video_grid_thw) if g is not None)
    cfg = model.config.text_config
    attn_layers = sum(1 for t in getattr(cfg, "layer_types", ["full_attention"] * cfg.num_hidden_layers) if t == "full_attention")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    causal_pairs = sum(len(s) * (len(s) + 1) / 2 for s in samples)
    attn = 3 * 4 * causal_pairs * cfg.num_attention_heads * head_dim * attn_layers
    lm_head = 6 * cfg.vocab_size * cfg.hidden_size * tokens
    return 6 * text_params * tokens + lm_head + 6 * vision_params * patches + attn


def run_method(model, method, samples, *, warmup, iters):
    import qwenvl

    patch_kwargs = {
        "ours": {},
        "ours+fusedce": {"fused_cross_entropy": True},
        "ours+compile": {"compile": True},
        "ours+compile+fusedce": {"compile": True, "fused_cross_entropy": True},
    }
    if method in patch_kwargs:
        ctx = qwenvl.patch(model, **patch_kwargs[method])
        inputs = packed_inputs(model, samples, "upstream")
    elif method == "ours-nohost":
        ctx, inputs = qwenvl.patch(model), packed_inputs(model, samples, "upstream", host=False)
    elif method == "native-packed":
        ctx, inputs = contextlib.nullcontext(), packed_inputs(model, samples, "hf_positions", host=False)
    elif method == "padded":
        ctx, inputs = contextlib.nullcontext(), padded_inputs(model, samples)
    else:
        raise ValueError(method)
    from qwenvl.data import to_device

    # Pinned once, as the DataLoader's pinning thread does off the step; each step copies without waiting.
    inputs = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    times, sites = [], None
    torch.cuda.reset_peak_memory_stats()
    with ctx:
        for i in range(warmup + iters):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i == warmup:  # one step under the sync detector (not timed itself)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        model(**to_device(inputs, "cuda"), use_cache=False).loss.backward()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                sites = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
                torch.cuda.synchronize()
                continue
            start = time.perf_counter()
            model(**to_device(inputs, "cuda"), use_cache=False).loss.backward()
            torch.cuda.synchronize()
            if i > warmup:
                times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30, sites


def _short(site: str) -> str:
    """``transformers/models/qwen2_vl/modeling_qwen2_vl.py:1026`` rather than the whole path."""
    for anchor in ("/transformers/", "/qwenvl/", "/torch/", "/fla/", "/liger_kernel/"):
        if anchor in site:
            return anchor.strip("/") + "/" + site.split(anchor, 1)[1]
    return site


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["qwen2_5_vl", "qwen3_vl"], choices=list(CONFIGS))
    p.add_argument("--mixes", nargs="+", default=["images-12x448", "mixed"], choices=list(MIXES))
    p.add_argument("--methods", nargs="+", default=["ours", "ours-nohost", "ours+compile", "ours+compile+fusedce", "native-packed", "padded"])
    p.add_argument("--text-layers", type=int, default=8, help="text decoder layers; 0: the real model's (full depth)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import transformers

    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    rows = []
    print(f"{gpu}, torch {torch.__version__}, transformers {transformers.__version__}, text layers {args.text_layers}")
    print(f"{'model':<11} {'mix':<14} {'method':<21} {'tokens':>6} {'ms':>8} {'tok/s':>8} {'GiB':>6} {'MFU':>5} {'syncs':>5} {'vs ours':>7}")
    for name in args.models:
        model = build(name, args.text_layers)
        for mix in args.mixes:
            samples = samples_for(model, mix)
            tokens = sum(len(s) for s in samples)
            flops = flops_per_step(model, samples)
            base = None
            for method in args.methods:
                try:
                    seconds, gib, sites = run_method(model, method, samples, warmup=args.warmup, iters=args.iters)
                    syncs = len(sites)
                except Exception as exc:  # noqa: BLE001 - a method that cannot run is reported, the rest go on
                    print(f"{name:<11} {mix:<14} {method:<21} failed: {type(exc).__name__}: {str(exc)[:160]}")
                    rows.append({"model": name, "mix": mix, "method": method, "error": f"{type(exc).__name__}: {exc}"[:500]})
                    torch.cuda.empty_cache()
                    continue
                base = base or seconds
                mfu = flops / seconds / peak if peak else None
                row = {"model": name, "mix": mix, "method": method, "tokens": tokens, "ms": seconds * 1e3,
                       "tokens_per_s": tokens / seconds, "peak_gib": gib, "mfu": mfu, "host_syncs": syncs,
                       "sync_sites": dict(Counter(_short(s) for s in sites)), "speedup_vs_ours": base / seconds}
                rows.append(row)
                print(f"{name:<11} {mix:<14} {method:<21} {tokens:>6} {seconds*1e3:>8.1f} {tokens/seconds:>8.0f} {gib:>6.1f} "
                      f"{(mfu or 0)*100:>4.0f}% {syncs if syncs is not None else '-':>5} {base/seconds:>6.2f}x", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
                       "text_layers": args.text_layers, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
