"""How often flash-linear-attention's JIT kernels compile over a run of varied packed rows (Qwen3.5, CUDA).

fla's Gated DeltaNet kernels are Triton kernels (autotuned) and, on Hopper with Triton < 3.7.1, tilelang kernels
for the backward; both compile on first use of a new specialisation. A packed row's token count changes from
step to step, so unless those kernels treat it as dynamic, each new count can compile again. The collator's
``pad_to_multiple_of`` rounds every row up (the padding its own masked segment, no loss on it), so a run sees few
distinct counts. This script runs ``--steps`` training steps (forward + backward) of a Qwen3.5-shaped model
(``model_step.py``'s, ``--text-layers`` deep) on text rows of random sample lengths, once per rounding, each in
its own process with empty Triton and tilelang caches, and reports:

    kernels     compiled kernels in the Triton / tilelang on-disk caches after the first step and after the last
                (every compilation, autotune candidates included, writes one entry)
    slow steps  steps slower than 3x the median step (a compilation inside)
    first step  the first step's seconds (the cold start a run pays once)

Usage::

    python benchmarks/fla_shapes.py --out fla-shapes.json [--steps 50] [--pad-to 0 512 8192] [--linear-backend fla]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import random
import statistics
import subprocess
import sys
import tempfile
import time

HERE = Path(__file__).resolve().parent


def _entries(folder: str) -> int:
    """Compiled kernels in a cache folder: Triton writes one directory per kernel; tilelang one per kernel too."""
    path = Path(folder)
    return sum(1 for p in path.iterdir() if p.is_dir()) if path.is_dir() else 0


def _lengths(rng: random.Random, budget: int) -> list[int]:
    """Sample lengths of one packed row: random samples of 64-2048 tokens until the next would pass ``budget``."""
    out = []
    while True:
        n = rng.randint(64, 2048)
        if sum(out) + n > budget:
            return out or [budget]
        out.append(n)


def child(args) -> dict:
    """One rounding in this process (its caches set by the parent): the run and its counts."""
    import torch

    sys.path.insert(0, str(HERE))
    import model_step
    import qwenvl
    from qwenvl.data import PackedCollator, to_device
    from qwenvl.verify.batches import SampleSpec, make_sample, pack

    model = model_step.build("qwen3_5", args.text_layers)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    pad_to = args.pad_to or None
    counts, times, after_first = set(), [], None
    with qwenvl.patch(model, linear_backend=args.linear_backend):
        for step in range(args.steps):
            samples = [make_sample(model.config, SampleSpec(text=n), generator=gen) for n in _lengths(rng, args.budget)]
            batch = pack(model, samples)  # the collator's row, labels and host metadata included
            inputs = PackedCollator("upstream", vision=batch.vision, pad_to_multiple_of=pad_to)(batch.items)
            counts.add(int(inputs["input_ids"].shape[1]))
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**to_device(inputs, "cuda"), use_cache=False).loss.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if step == 0:
                after_first = (_entries(os.environ["TRITON_CACHE_DIR"]), _entries(os.environ["TILELANG_CACHE_DIR"]))
    median = statistics.median(times[1:])
    return {
        "pad_to": args.pad_to, "linear_backend": args.linear_backend, "steps": args.steps,
        "distinct_token_counts": len(counts),
        "triton_kernels_first": after_first[0], "triton_kernels_last": _entries(os.environ["TRITON_CACHE_DIR"]),
        "tilelang_kernels_first": after_first[1], "tilelang_kernels_last": _entries(os.environ["TILELANG_CACHE_DIR"]),
        "slow_steps": sum(1 for t in times[1:] if t > 3 * median), "first_step_s": times[0], "median_ms": median * 1e3,
        "total_s": sum(times),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--pad-to", type=int, nargs="+", default=[0, 512, 8192], help="pad_to_multiple_of per run; 0: none; the budget: one shape")
    p.add_argument("--budget", type=int, default=8192, help="tokens per packed row at most (before rounding)")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--linear-backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be at least 2 (the first step compiles, the rest give the median), got {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    import torch

    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: {args.steps} steps per run, Qwen3.5 {args.text_layers} text layers, rows <= {args.budget} tokens")
    print(f"{'pad_to':>6} {'counts':>6} {'triton 1st':>10} {'triton end':>10} {'tilelang 1st':>12} {'tilelang end':>12} "
          f"{'slow':>4} {'first s':>8} {'median ms':>9}")
    rows = []
    for pad_to in args.pad_to:
        with tempfile.TemporaryDirectory() as triton_dir, tempfile.TemporaryDirectory() as tilelang_dir:
            env = {**os.environ, "TRITON_CACHE_DIR": triton_dir, "TILELANG_CACHE_DIR": tilelang_dir}
            command = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--pad-to", str(pad_to),
                       "--budget", str(args.budget), "--text-layers", str(args.text_layers),
                       "--linear-backend", args.linear_backend, "--seed", str(args.seed)]
            done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            row = {"pad_to": pad_to, "error": f"exit {done.returncode}: {done.stdout[-300:]}"}
            print(f"{pad_to:>6} failed: {row['error']}")
        else:
            row = json.loads(lines[-1])
            print(f"{pad_to:>6} {row['distinct_token_counts']:>6} {row['triton_kernels_first']:>10} {row['triton_kernels_last']:>10} "
                  f"{row['tilelang_kernels_first']:>12} {row['tilelang_kernels_last']:>12} {row['slow_steps']:>4} "
                  f"{row['first_step_s']:>8.1f} {row['median_ms']:>9.1f}", flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
