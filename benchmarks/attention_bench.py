"""Kernel-level benchmark of packed attention on CUDA (bf16; by default causal, head dim 128, 32 query heads).

For each packing (total tokens x documents) and kv-head count it times forward and forward+backward of:

    ours-torch     qwenvl varlen_attention(backend="torch")
    ours-auto      qwenvl varlen_attention(backend="auto"), what the patched models call by default
    raw-varlen     torch.nn.attention.varlen.varlen_attn called directly (our overhead = ours - raw)
    ours-sdpa      qwenvl varlen_attention(backend="sdpa"), one SDPA call per document
    flex           compiled flex_attention with a document-causal BlockMask (skipped if it fails)
    dense-sdpa     one SDPA call over the whole row with a dense (T, T) block-diagonal causal mask

Times are medians of CUDA-event timings after warmup. TFLOP/s counts only the useful work (the attended
causal pairs of each document, or all its pairs with ``--bidirectional``: 4 * N * H flops per pair forward, 2.5x
that backward) for every method, so a dense method is charged for the same work as a varlen one. Usage::

    python benchmarks/attention_bench.py --out bench-attention.json
    # the vision towers' shapes: non-causal, per-frame segments, head dim 80 (Qwen2.5-VL) and 64 (Qwen3-VL-4B)
    python benchmarks/attention_bench.py --bidirectional --head-dim 80 --heads 16 --kv-heads 16 --docs 12 48
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

HEAD_DIM = 128  # defaults: the text layers of the Qwen-VL models
N_HEADS = 32
METHODS = ("ours-torch", "ours-auto", "raw-varlen", "ours-sdpa", "flex", "dense-sdpa")  # make_methods' keys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="total packed tokens")
    p.add_argument("--docs", type=int, nargs="+", default=[8, 16], help="documents per packed row")
    p.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8], help="kv heads (32 = MHA, 8 = GQA 4)")
    p.add_argument("--head-dim", type=int, default=HEAD_DIM)
    p.add_argument("--heads", type=int, default=N_HEADS, help="query heads")
    p.add_argument("--bidirectional", action="store_true", help="non-causal within each document (vision towers)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=150.0, help="skip remaining methods once this much time is spent")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    return p.parse_args(argv)


def doc_lengths(total: int, docs: int, seed: int = 0) -> list[int]:
    """Uneven document lengths summing to ``total`` (fixed seed), each at least 1."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(docs, generator=gen) + 0.25
    lengths = (weights / weights.sum() * (total - docs)).floor().long() + 1
    lengths[-1] += total - int(lengths.sum())
    return lengths.tolist()


def useful_flops(lengths: list[int], n_heads: int, head_dim: int, causal: bool = True) -> float:
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    return 4.0 * n_heads * head_dim * pairs


def time_ms(fn, *, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_methods(q_TNH, k_TKH, v_TKH, lengths, causal: bool = True):
    """name -> forward callable returning (T, N, H)-shaped output (any layout), built lazily per method."""
    from qwenvl.attention import varlen_attention
    from qwenvl.packing import VarlenMeta

    device = q_TNH.device
    T, N, H = q_TNH.shape
    K = k_TKH.shape[1]
    meta = VarlenMeta.from_lengths(lengths, device=device)

    def ours(backend):
        return lambda: varlen_attention(q_TNH, k_TKH, v_TKH, meta, causal=causal, backend=backend)

    def raw_varlen():
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        gqa = {"enable_gqa": True} if K != N and "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
        k, v = k_TKH, v_TKH
        if K != N and not gqa:
            k, v = k.repeat_interleave(N // K, dim=1), v.repeat_interleave(N // K, dim=1)
        cu = meta.cu_seqlens
        window = (-1, 0) if causal else (-1, -1)
        return lambda: varlen_attn(q_TNH, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, window_size=window, **gqa)

    def to_1NTH(t):
        return t.transpose(0, 1).unsqueeze(0)

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        def document(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        mask_mod = document_causal if causal else document
        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
        compiled = torch.compile(flex_attention, dynamic=False)
        q, k, v = to_1NTH(q_TNH), to_1NTH(k_TKH), to_1NTH(v_TKH)
        return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=K != N)

    def dense_sdpa():
        import torch.nn.functional as F

        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
        idx = torch.arange(T, device=device)
        mask = doc[:, None] == doc[None, :]
        if causal:
            mask &= idx[:, None] >= idx[None, :]
        q, k, v = to_1NTH(q_TNH), to_1NTH(k_TKH), to_1NTH(v_TKH)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K != N)

    return {
        "ours-torch": lambda: ours("torch"),
        "ours-auto": lambda: ours("auto"),
        "raw-varlen": raw_varlen,
        "ours-sdpa": lambda: ours("sdpa"),
        "flex": flex,
        "dense-sdpa": dense_sdpa,
    }


def bench_config(total, docs, kv_heads, args, deadline):
    lengths = doc_lengths(total, docs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q, shape_kv = (total, args.heads, args.head_dim), (total, kv_heads, args.head_dim)
    q, k, v = (
        torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        for s in (shape_q, shape_kv, shape_kv)
    )
    causal = not args.bidirectional
    flops = useful_flops(lengths, args.heads, args.head_dim, causal)
    builders = make_methods(q, k, v, lengths, causal)
    rows = []
    for name in args.methods:
        row = {"tokens": total, "docs": docs, "kv_heads": kv_heads, "method": name, "max_doc": max(lengths)}
        rows.append(row)
        if time.monotonic() > deadline:
            row["error"] = "skipped: time budget spent"
            continue
        try:
            fwd = builders[name]()
            out = fwd()
            grad = torch.randn_like(out)

            def fwd_bwd():
                torch.autograd.grad(fwd(), (q, k, v), grad)

            row["fwd_ms"] = time_ms(lambda: fwd(), warmup=args.warmup, iters=args.iters)
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, warmup=args.warmup, iters=args.iters)
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
        except Exception as exc:  # a method that does not run here is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        finally:
            torch.cuda.empty_cache()
    return rows


def format_table(rows) -> str:
    header = (
        f"{'tokens':>6} {'docs':>4} {'kv':>3} {'method':<11} {'fwd ms':>8} {'TFLOP/s':>8} {'f+b ms':>8} {'TFLOP/s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        head = f"{r['tokens']:>6} {r['docs']:>4} {r['kv_heads']:>3} {r['method']:<11}"
        if "error" in r:
            lines.append(f"{head} {r['error']}")
        else:
            fwd = f"{r['fwd_ms']:>8.3f} {r['fwd_tflops']:>8.1f}"
            lines.append(f"{head} {fwd} {r['fwd_bwd_ms']:>8.3f} {r['fwd_bwd_tflops']:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_bench.py needs a CUDA device", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    rows = []
    for total in args.tokens:
        for docs in args.docs:
            for kv_heads in args.kv_heads:
                rows += bench_config(total, docs, kv_heads, args, deadline)
                print(format_table(rows[-len(args.methods):]).split("\n", 2)[-1], flush=True)
    print()
    print(format_table(rows))
    if args.out:
        report = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "dtype": "bfloat16",
            "head_dim": args.head_dim,
            "n_heads": args.heads,
            "causal": not args.bidirectional,
            "warmup": args.warmup,
            "iters": args.iters,
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
