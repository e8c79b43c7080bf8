"""The data path at scale on the CPU: the length pass, the cache, the loader. Prints a table, writes JSON.

Builds a data set in a scratch folder (``--text-rows`` text rows, ``--image-rows`` rows with a 448x448 PNG each,
``--distinct-images`` distinct files, the tiny default Qwen2.5-VL's real processor) and measures, in one run:

    length pass, header lengths   SupervisedDataset built on a first start: rows/s, seconds (qwenvl.data.lengths)
    length pass, processed        the same with header_lengths=False (every row processed, as before) on
                                  --before-rows rows, extrapolated per row
    length pass, from the cache   the second start of the same run (qwenvl.data.length_cache)
    loader                        samples/s of a DataLoader over the packed rows, --workers 0 / 2 / ...
    peak RSS                      of this process after the length pass

Usage::

    python benchmarks/data.py --out data.json [--text-rows 100000 --image-rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--text-rows", type=int, default=100_000)
    p.add_argument("--image-rows", type=int, default=20_000)
    p.add_argument("--distinct-images", type=int, default=500, help="distinct PNG files the image rows cycle through")
    p.add_argument("--before-rows", type=int, default=2_000, help="rows measured with every row processed (the old way)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 8])
    p.add_argument("--loader-rows", type=int, default=200, help="packed rows the loader benchmark reads")
    return p.parse_args(argv)


def _make_data(folder: Path, text_rows: int, image_rows: int, distinct: int) -> Path:
    from PIL import Image, ImageDraw

    (folder / "images").mkdir(parents=True)
    for i in range(min(distinct, image_rows)):
        image = Image.new("RGB", (448, 448), (i * 37 % 256, i * 91 % 256, 120))
        ImageDraw.Draw(image).ellipse((i % 200, 40, 300 + i % 100, 330), fill=(20, 60, 220))
        image.save(folder / "images" / f"{i}.png")
    with open(folder / "data.jsonl", "w") as f:
        for i in range(text_rows):
            turns = [{"from": "human", "value": f"Question {i}: what is {i} plus {i * 3}? Answer briefly."},
                     {"from": "gpt", "value": f"{i} plus {i * 3} is {i * 4}."}]
            f.write(json.dumps({"conversations": turns}) + "\n")
        for i in range(image_rows):
            turns = [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                     {"from": "gpt", "value": f"A blue ellipse on a coloured square ({i})."}]
            f.write(json.dumps({"image": f"images/{i % distinct}.png", "conversations": turns}) + "\n")
    return folder / "data.jsonl"


def _timed(build):
    start = time.perf_counter()
    result = build()
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="qwenvl-data-bench-"))
    os.environ["QWENVL_CACHE_DIR"] = str(scratch / "cache")
    try:
        import torch

        from qwenvl.data import PackedCollator, PackedDataset, SupervisedDataset
        from qwenvl.data.processor import load_processor
        from qwenvl.fixtures import model_dir, tiny_model

        path = _make_data(scratch / "big", args.text_rows, args.image_rows, args.distinct_images)
        small = _make_data(scratch / "small", args.before_rows * args.text_rows // max(1, args.text_rows + args.image_rows),
                           args.before_rows * args.image_rows // max(1, args.text_rows + args.image_rows), args.distinct_images)
        processor, model = load_processor(model_dir("qwen2_5_vl")), tiny_model("qwen2_5_vl")
        rows = args.text_rows + args.image_rows

        def build(data, **kwargs):
            return SupervisedDataset(str(data), processor, model=model, model_max_length=4096, **kwargs)

        first, first_s = _timed(lambda: build(path))
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cached, cached_s = _timed(lambda: build(path))
        assert cached.lengths == first.lengths and cached.length_cache_path == first.length_cache_path
        before, before_s = _timed(lambda: build(small, header_lengths=False, length_cache=False))
        before_per_row = before_s / len(before)
        packed, pack_s = _timed(lambda: PackedDataset(first, budget=8192, seed=0))

        loader = []
        for workers in args.workers:
            data = torch.utils.data.DataLoader(packed, batch_size=1, shuffle=False, num_workers=workers, collate_fn=PackedCollator())
            it = iter(data)
            next(it)  # worker start-up is not throughput
            start, samples = time.perf_counter(), 0
            for n, _ in enumerate(it, start=1):  # rows in order: row n holds packing.rows[n] samples
                samples += len(packed.packing.rows[n])
                if n >= args.loader_rows:
                    break
            loader.append({"workers": workers, "samples_per_s": samples / (time.perf_counter() - start)})

        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "torch": torch.__version__,
            "rows": rows, "text_rows": args.text_rows, "image_rows": args.image_rows,
            "first_start_s": first_s, "first_rows_per_s": rows / first_s,
            "cached_start_s": cached_s,
            "processed_rows": len(before), "processed_per_row_ms": 1e3 * before_per_row,
            "processed_extrapolated_s": before_per_row * rows,
            "speedup_first_start": before_per_row * rows / first_s,
            "pack_s": pack_s, "fill_ratio": packed.packing.fill_ratio,
            "peak_rss_mb": rss_mb,
            "loader": loader,
        }
        print(f"{rows:,} rows ({args.text_rows:,} text, {args.image_rows:,} with a 448x448 PNG), tiny Qwen2.5-VL processor")
        print(f"{'length pass':<38}{'seconds':>10}{'rows/s':>12}")
        print(f"{'processed (every row, the old way)':<38}{report['processed_extrapolated_s']:>10.1f}{rows / report['processed_extrapolated_s']:>12,.0f}   (measured on {len(before):,} rows)")
        print(f"{'header lengths, first start':<38}{first_s:>10.1f}{rows / first_s:>12,.0f}   ({report['speedup_first_start']:.1f}x)")
        print(f"{'from the cache, second start':<38}{cached_s:>10.1f}{rows / cached_s:>12,.0f}")
        print(f"packing {pack_s:.1f} s (fill {packed.packing.fill_ratio:.3f}); peak RSS after the length pass {rss_mb:,.0f} MB")
        for entry in loader:
            print(f"loader, {entry['workers']} workers: {entry['samples_per_s']:,.0f} samples/s")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
