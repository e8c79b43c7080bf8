"""1 GPU against 2: loss curves, tokens/s and peak memory of ``QwenVLTrainer`` under DDP and FSDP2 (CUDA, torchrun).

The model is Qwen2.5-VL-3B-shaped with random weights, built from a config (no download): the real vision tower
(32 blocks, width 1280, window attention, patch 14), a text stack of the real width (2048, GQA 16/2, vocabulary
151,936) with fewer layers (``--text-layers``, default 8: about 1.6B parameters). fp32 master weights, bf16
compute (autocast on one GPU and under DDP; FSDP2's bf16 mixed-precision policy), AdamW with a learning rate per
component, gradient clipping at 1. The data are synthetic samples (random text tokens, random 448x448-class
images of three sizes, text-only samples), packed by ``PackedDataset(shards=2)``: every run trains on the same
rows in every optimizer step, one per GPU on 2 GPUs, two accumulated micro-batches on 1 GPU (same global
batch). Runs (each its own process; torchrun for 2 GPUs and for FSDP2)::

    one            1 GPU, plain process (no DDP), accumulation 2  the reference curve; tokens/s baseline
    one-again      the same run again: the GPU kernels' own run-to-run nondeterminism (atomics)
    one-fp32       1 GPU in fp32 (TF32 matmuls): |one - one-fp32| is what bf16 itself changes, the noise
                   scale the 2-GPU curves are judged against
    ddp            2 GPUs, DDP (NCCL)                            curve vs one; tokens/s vs one
    fsdp2-1        1 GPU, FSDP2 (accelerate, through TrainingArguments), accumulation 2: FSDP2's own numerics
                   (bf16 parameters and gradient reduction, where DDP autocasts)
    fsdp2          2 GPUs, FSDP2                                 curve vs fsdp2-1 and one; tokens/s vs one
    zero2, zero3   2 GPUs, DeepSpeed with examples/deepspeed_zero{2,3}.json (``--suite deepspeed``; needs the
                   deepspeed package)

The 2-GPU curves agree "within bf16 noise" when their largest per-step difference from the 1-GPU curve of the
same numerics is below the largest difference bf16 makes (one vs one-fp32). With two micro-batches the
order of accumulation cannot matter (a + b == b + a), so DDP can be bitwise equal to one GPU where the kernels
are deterministic (the CPU test, parity_tests/test_distributed.py, shows it on gloo).

``--suite text-rank`` instead runs one / ddp / fsdp2 with every sample of rank 1's shard turned text-only (same
lengths, so the same rows): rank 1 never sees an image and trains through the vision dummy pass (add
``--runs one ddp fsdp2 zero3`` where DeepSpeed is installed).

Reported per run: loss per optimizer step, median step time after warm-up (wall time between step ends,
data loading included), tokens/s (all tokens of the step, vision placeholders included), peak allocated and
reserved memory per GPU, the dummy passes each rank ran; and per comparison the largest and mean |loss
difference| against the reference, with the bf16 effect (one vs one-fp32) beside it. Usage (the driver launches
each run itself)::

    python benchmarks/distributed.py --out distributed.json                    # the main suite, ~6 min on H200s
    python benchmarks/distributed.py --runs one one-again one-fp32 --out d.json   # or in pieces (same --out /
    python benchmarks/distributed.py --runs ddp fsdp2-1 fsdp2 --out d.json        # --workdir): the report joins them
    python benchmarks/distributed.py --report-only --workdir runs/ --out d.json   # a report from <run>.json files
    python benchmarks/distributed.py --suite text-rank --out text-rank.json    # ~3 min
    python benchmarks/distributed.py --suite deepspeed --out deepspeed.json    # ~3 min, needs deepspeed
    torchrun --nproc_per_node 2 benchmarks/distributed.py --worker ddp --result ddp.json   # one run by hand
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 151_936
TEXT = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2, vocab_size=VOCAB,
            max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)  # fmt: skip
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              in_channels=3, tokens_per_second=2)  # fmt: skip
TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)

# Image grids in 14-px patches: 448x448, 336x336, 224x448 (256, 144, 128 tokens after the 2x2 merger).
GRIDS = ((32, 32), (24, 24), (16, 32))

RUNS = {
    # name: (GPUs, engine, fp32)
    "one": (1, None, False),
    "one-again": (1, None, False),
    "one-fp32": (1, None, True),
    "ddp": (2, None, False),
    "fsdp2-1": (1, "fsdp2", False),
    "fsdp2": (2, "fsdp2", False),
    "zero2": (2, "zero2", False),
    "zero3": (2, "zero3", False),
}
SUITES = {
    "main": {"runs": ["one", "one-again", "one-fp32", "ddp", "fsdp2-1", "fsdp2"],
             "compare": {"one-again": "one", "one-fp32": "one", "ddp": "one", "fsdp2-1": "one", "fsdp2": "fsdp2-1"}},
    "text-rank": {"runs": ["one", "ddp", "fsdp2"], "compare": {"ddp": "one", "fsdp2": "one", "zero3": "one"}},
    "deepspeed": {"runs": ["one", "one-fp32", "zero2", "zero3"],
                  "compare": {"one-fp32": "one", "zero2": "one", "zero3": "one"}},
}  # fmt: skip
JUDGED = ("ddp", "fsdp2", "zero2", "zero3")  # the multi-GPU runs judged against the bf16 effect
SHARDS = 2  # rows are packed for 2 ranks in every run: the global batch is 2 rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--suite", choices=list(SUITES), default="main")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), help="a subset of the suite's runs")
    p.add_argument("--out", default="distributed.json", help="the JSON report (the driver)")
    p.add_argument("--workdir", default=None, help="where each run writes its result (default: beside --out)")
    p.add_argument("--worker", choices=list(RUNS), help="run one configuration (under torchrun)")
    p.add_argument("--result", help="the worker's JSON result")
    p.add_argument("--text-rank", action="store_true", help="turn every sample of rank 1's shard text-only")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 30, text-rank suite 12)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--text-layers", type=int, default=8)
    p.add_argument("--budget", type=int, default=8192, help="tokens per packed row")
    p.add_argument("--samples", type=int, default=None, help="samples in the data (default: enough for the steps)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--timeout", type=int, default=900, help="seconds per run (the driver)")
    p.add_argument("--tiny", action="store_true", help="smoke test on CPU: the tiny fixture model, gloo, no FSDP2 runs")
    p.add_argument("--report-only", action="store_true", help="run nothing: report the runs found in --workdir")
    p.add_argument("--balance", action="store_true",
                   help="run nothing: how evenly the packing splits tokens and estimated compute between the ranks")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps <= args.warmup:
        p.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}: give more steps or less warm-up")
    return args


# ---------------------------------------------------------------------------------------------------------
# Model and data


def build_config():
    import transformers

    if ARGS.tiny:
        from qwenvl.fixtures import tiny_config

        return tiny_config("qwen2_5_vl")
    text = dict(TEXT, num_hidden_layers=ARGS.text_layers)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=VISION, **TOKENS)


def grids():
    return ((4, 4), (8, 8), (4, 8)) if ARGS.tiny else GRIDS


def sample_tokens():
    return (8, 120) if ARGS.tiny else (120, 1600)


class SyntheticData(torch.utils.data.Dataset):
    """Samples drawn from a seeded generator, each built on demand from its own seed: every process and every run
    sees the same sample ``i``. ``lengths`` is known up front (the packer needs it)."""

    modalities = ("image",)

    def __init__(self, config, n: int, *, seed: int = 0, text_only=frozenset()):
        import transformers

        gen = torch.Generator().manual_seed(seed)
        self.config, self.seed = config, seed
        self.specs = []
        for i in range(n):
            text = int(torch.randint(*sample_tokens(), (1,), generator=gen))
            grid = grids()[int(torch.randint(0, len(grids()), (1,), generator=gen))]
            image = grid if torch.rand(1, generator=gen) < 0.7 else None
            self.specs.append((text, image))
        self.lengths = [self._length(text, image) for text, image in self.specs]
        for i in text_only:  # the same length, all text: the packing (which reads only lengths) is unchanged
            self.specs[i] = (self.lengths[i], None)
        with torch.device("meta"):  # get_rope_index reads only the config: a model without storage will do
            self.rope_owner = transformers.Qwen2_5_VLModel._from_config(config)

    @staticmethod
    def _length(text, image):
        return text + (0 if image is None else image[0] * image[1] // 4 + 2)

    def __len__(self):
        return len(self.specs)

    def __getitem__(self, i):
        from qwenvl.positions import rope_index
        from qwenvl.verify.batches import SampleSpec, make_sample

        text, image = self.specs[i]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        sample = make_sample(self.config, SampleSpec(text=text, image=image), generator=gen)
        ids = sample.input_ids
        assert ids.numel() == self.lengths[i]
        labels = ids.clone()
        for token in (self.config.image_token_id, self.config.vision_start_token_id, self.config.vision_end_token_id):
            labels[ids == token] = -100
        item = {"input_ids": ids, "labels": labels}
        if sample.pixel_values is not None:
            item["pixel_values"], item["image_grid_thw"] = sample.pixel_values, sample.image_grid_thw
        item["position_ids"] = rope_index(self.rope_owner, ids[None], image_grid_thw=item.get("image_grid_thw"))[:, 0]
        return item


# ---------------------------------------------------------------------------------------------------------
# One run (under torchrun)


def worker(name: str) -> None:
    import transformers
    from transformers import TrainerCallback

    import qwenvl
    from qwenvl.data import PackedCollator, PackedDataset, shard_by_tokens
    from qwenvl.train.argument import TrainingArguments
    from qwenvl.train.trainer import QwenVLTrainer

    gpus, engine, fp32 = RUNS[name]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != gpus:
        raise SystemExit(f"run {name} needs {gpus} processes, got WORLD_SIZE={world}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = not ARGS.tiny
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local)
    steps = ARGS.steps
    config = build_config()

    n = sample_count(steps)
    data = SyntheticData(config, n, seed=0)
    if ARGS.text_rank:
        data = SyntheticData(config, n, seed=0, text_only=frozenset(shard_by_tokens(data.lengths, SHARDS, seed=0)[1]))
    rows = PackedDataset(data, ARGS.budget, seed=0, shards=SHARDS)
    if len(rows.packing.steps) < steps:
        raise SystemExit(f"{len(rows.packing.steps)} steps of data for {steps} steps: raise --samples")

    torch.manual_seed(0)
    with device:
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    model.train()
    params = sum(p.numel() for p in model.parameters())

    extra = {}
    if engine == "fsdp2":
        fsdp_config = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
        extra = dict(fsdp="full_shard", fsdp_config=fsdp_config)
    elif engine in ("zero2", "zero3"):
        extra = dict(deepspeed=str(ROOT / "examples" / f"deepspeed_{engine}.json"))
    args = TrainingArguments(
        output_dir=str(Path(ARGS.result).with_suffix("")) + "-out",
        max_steps=steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=SHARDS // world,
        learning_rate=ARGS.lr,
        vision_tower_lr=ARGS.lr / 5,
        mm_projector_lr=ARGS.lr * 2,
        weight_decay=0.01,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=3,
        max_grad_norm=1.0,
        bf16=cuda and not fp32,
        tf32=True if cuda and fp32 else None,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and "LOCAL_RANK" in os.environ else None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=2 if cuda else 0,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        **extra,
    )

    record = {"losses": [], "step_end": [], "tokens": [], "timeline": []}
    micro = {"loss": torch.zeros((), dtype=torch.float64, device=device), "tokens": 0}
    clock = StepClock(cuda)

    original = QwenVLTrainer.training_step

    def training_step(trainer, model_, inputs, *a, **k):
        clock.micro_begin(inputs)
        loss = original(trainer, model_, inputs, *a, **k)
        clock.micro_end()
        micro["loss"] += loss.detach()  # on the device: read once a step, at its end, not after every micro-batch
        micro["tokens"] += int(inputs["input_ids"].numel())
        return loss

    QwenVLTrainer.training_step = training_step

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            record["step_end"].append(time.perf_counter())
            clock.last_end = record["step_end"][-1]

        def on_step_end(self, args_, state, control, **k):
            clock.step_end()
            if cuda:
                torch.cuda.synchronize()
            record["step_end"].append(time.perf_counter())
            record["timeline"].append(clock.read(record["step_end"][-1]))
            totals = torch.stack([micro["loss"], torch.tensor(float(micro["tokens"]), dtype=torch.float64, device=device)])
            if world > 1:
                torch.distributed.all_reduce(totals)
            # each rank's loss is its label-token sum over the global count times the world size: the mean over
            # ranks of the per-rank sums is the step's loss, as the one-GPU run's sum of its micro-batch losses
            record["losses"].append(float(totals[0]) / world)
            record["tokens"].append(int(totals[1]))
            micro["loss"], micro["tokens"] = torch.zeros_like(micro["loss"]), 0

    with qwenvl.patch(model):
        trainer = QwenVLTrainer(
            model=model, args=args, train_dataset=rows, data_collator=PackedCollator(), callbacks=[Timer()]
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    peak = [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30] if cuda else [0.0, 0.0]
    dummy = dict(trainer.vision_dummy.dummy_passes) if trainer.vision_dummy is not None else None
    peaks, dummies, timelines = [peak], [dummy], [record["timeline"]]
    if world > 1:
        peaks, dummies, timelines = [None] * world, [None] * world, [None] * world
        torch.distributed.all_gather_object(peaks, peak)
        torch.distributed.all_gather_object(dummies, dummy)
        torch.distributed.all_gather_object(timelines, record["timeline"])
    times = [b - a for a, b in zip(record["step_end"], record["step_end"][1:])]
    timed = times[ARGS.warmup :]
    tokens = record["tokens"][ARGS.warmup :]
    median = statistics.median(timed)
    result = {
        "run": name,
        "gpus": world,
        "engine": engine or ("ddp" if gpus > 1 else "none"),
        "fp32": fp32,
        "text_rank": ARGS.text_rank,
        "parameters": params,
        "steps": steps,
        "warmup": ARGS.warmup,
        "gradient_accumulation": SHARDS // world,
        "losses": record["losses"],
        "step_times_s": times,
        "median_step_s": median,
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": sum(tokens) / sum(timed),
        "peak_allocated_gib": [p[0] for p in peaks],
        "peak_reserved_gib": [p[1] for p in peaks],
        "packing": rows.packing.report(),
        "dummy_passes_per_rank": dummies,
        "timeline_per_rank": timelines,
        "environment": environment(),
    }
    if int(os.environ.get("RANK", "0")) == 0:
        Path(ARGS.result).write_text(json.dumps(result, indent=1) + "\n")
        top = max(p[0] for p in peaks)
        print(f"{name}: {median * 1e3:.0f} ms/step, {result['tokens_per_s']:,.0f} tokens/s, peak {top:.1f} GiB")


class StepClock:
    """Where each optimizer step's time goes on one rank, read once the step has ended (``on_step_end``
    synchronizes anyway, so reading the CUDA events costs no extra wait)::

        wait       host time from the previous step's end to this step's first micro-batch entering
                   training_step: the data loader, the batch's copy to the GPU, the Trainer's own work
        compute    GPU time from the first micro-batch's start to the last one's end: forward and backward,
                   and whatever of DDP's gradient all-reduce the backward did not hide
        optimizer  GPU time from there to the step's end: clipping, the optimizer step, zeroing
        step       host time between step ends (what tokens/s divides by)

    with the rank's tokens and images of the step: a rank that waits at the all-reduce for a slower one shows
    its idle time as compute, so ranks are compared side by side. CPU (``--tiny``): host times throughout."""

    def __init__(self, cuda: bool):
        self.cuda, self.last_end = cuda, time.perf_counter()
        self._reset()

    def _reset(self):
        self.entry, self.start, self.end, self.tokens, self.images = None, None, None, 0, 0

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def micro_begin(self, inputs) -> None:
        if self.start is None:
            self.entry, self.start = time.perf_counter(), self._mark()
        self.tokens += int(inputs["input_ids"].numel())
        grid = inputs.get("image_grid_thw")
        self.images += 0 if grid is None else int(grid.shape[0])

    def micro_end(self) -> None:
        self.end = self._mark()

    def step_end(self) -> None:
        self.finish = self._mark()

    def read(self, now: float) -> dict:
        """This step's figures; call after synchronizing."""
        if self.start is None:  # no micro-batch this step
            row = {"wait_ms": None, "compute_ms": None, "optimizer_ms": None}
        else:
            row = {
                "wait_ms": (self.entry - self.last_end) * 1e3,
                "compute_ms": self._ms(self.start, self.end),
                "optimizer_ms": self._ms(self.end, self.finish),
            }
        row.update(step_ms=(now - self.last_end) * 1e3, tokens=self.tokens, images=self.images)
        self.last_end = now
        self._reset()
        return row


def timeline_summary(run: dict, warmup: int) -> list[dict]:
    """Per rank, the medians of its timed steps' figures (``StepClock``)."""
    out = []
    for rank, steps in enumerate(run.get("timeline_per_rank") or []):
        timed = [s for s in steps[warmup:] if s["compute_ms"] is not None]
        if not timed:
            continue
        row = {"rank": rank}
        for key in ("wait_ms", "compute_ms", "optimizer_ms", "step_ms", "tokens", "images"):
            row[key] = statistics.median(s[key] for s in timed)
        out.append(row)
    return out


def sample_count(steps: int) -> int:
    """``--samples``, or enough for ``steps`` steps of ``SHARDS`` rows of ``--budget`` tokens (a sample is ~850
    tokens on average, ~75 with ``--tiny``), with room to spare."""
    return ARGS.samples or int(steps * SHARDS * ARGS.budget / (75 if ARGS.tiny else 850) * 1.15) + 8


def vision_token_cost(config) -> float:
    """What one vision token costs in text tokens' training FLOPs (``qwenvl.flops``), from the parameter counts of
    the model built on the meta device (attention's products left out)."""
    import transformers

    from qwenvl.flops import matmul_parameters

    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config)
    return matmul_parameters(model).vision_token_cost(config.vision_config.spatial_merge_size**2)


def balance() -> int:
    """The packing's split between ranks for this benchmark's data (``--steps`` of ``SHARDS`` rows of ``--budget``
    tokens): per step, the larger rank's tokens and estimated compute over the mean of the ranks, summed over the
    steps. DDP waits for the slower rank, so ``SHARDS / (compute ratio)`` bounds its scaling from imbalance alone."""
    from qwenvl.data import PackedDataset

    config = build_config()
    n = sample_count(ARGS.steps)
    data = SyntheticData(config, n, seed=0)
    weight = vision_token_cost(config)
    vision = [0 if image is None else image[0] * image[1] // config.vision_config.spatial_merge_size**2 for _, image in data.specs]
    cost = [length + (weight - 1) * v for length, v in zip(data.lengths, vision)]
    packing = PackedDataset(data, ARGS.budget, seed=0, shards=SHARDS).packing
    ratios = {}
    for name, per_sample in (("tokens", data.lengths), ("compute", cost)):
        per_step = [[sum(per_sample[i] for i in row) for row in step] for step in packing.steps]
        ratios[name] = sum(max(ranks) for ranks in per_step) / sum(sum(ranks) / len(ranks) for ranks in per_step)
    print(f"{len(data.lengths)} samples in {len(packing.steps)} steps of {SHARDS} rows of <= {ARGS.budget} tokens; "
          f"a vision token costs {weight:.2f} text tokens")  # fmt: skip
    print(f"{'split':<8} {'larger rank over mean':>22} {'scaling bound':>14}")
    for name, ratio in ratios.items():
        print(f"{name:<8} {ratio:>22.4f} {SHARDS / ratio:>13.2f}x")
    return 0


def environment() -> dict:
    import accelerate
    import transformers

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "python": platform.python_version(),
    }
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return env


# ---------------------------------------------------------------------------------------------------------
# The driver


def compare(run: dict, ref: dict) -> dict:
    diffs = [abs(a - b) for a, b in zip(run["losses"], ref["losses"])]
    rel = max(d / abs(b) for d, b in zip(diffs, ref["losses"]))
    return {"max_abs": max(diffs), "mean_abs": statistics.mean(diffs), "max_rel": rel}


def driver() -> int:
    suite = SUITES[ARGS.suite]
    runs = ARGS.runs or [r for r in suite["runs"] if not (ARGS.tiny and RUNS[r][1])]  # tiny (CPU): no FSDP2 / DeepSpeed
    if ARGS.report_only:
        runs = []
    out = Path(ARGS.out)
    work = Path(ARGS.workdir) if ARGS.workdir else out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in runs:
        gpus = RUNS[name][0]
        result = work / f"{name}.json"
        # One GPU without FSDP2 runs as a plain process: no DDP wrapper (transformers wraps even one process under
        # torchrun), the honest single-GPU baseline. FSDP2 needs a process group, so fsdp2-1 runs under torchrun.
        launcher = [sys.executable]
        if gpus > 1 or RUNS[name][1]:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        cmd = [*launcher, __file__, "--worker", name, "--result", str(result), "--steps", str(ARGS.steps),
               "--warmup", str(ARGS.warmup), "--text-layers", str(ARGS.text_layers), "--budget", str(ARGS.budget),
               "--lr", str(ARGS.lr)]  # fmt: skip
        if ARGS.tiny:
            cmd.append("--tiny")
        if ARGS.samples:
            cmd += ["--samples", str(ARGS.samples)]
        if ARGS.suite == "text-rank":
            cmd.append("--text-rank")
        start = time.monotonic()
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if ARGS.tiny:
            # the tiny model's ops are too small for intra-op threads: ranks spinning several each on shared cores
            # ran 10x slower (57 s against 6 s for 3 DDP steps with 8 threads a rank on 16 cores)
            env["OMP_NUM_THREADS"] = "1"
        if gpus == 1 and not ARGS.tiny:
            # A plain process that sees two GPUs gets wrapped in torch.nn.DataParallel by the Trainer.
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=ARGS.timeout, capture_output=True, text=True)
        (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not result.exists():
            print(f"   {name} failed (exit {proc.returncode}); last lines of {work / f'{name}.log'}:")
            print("\n".join((proc.stdout + proc.stderr).splitlines()[-25:]))
            results[name] = {"run": name, "failed": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-4000:]}
            continue
        results[name] = json.loads(result.read_text())
        print(f"   {name}: done in {time.monotonic() - start:.0f} s", flush=True)

    # Runs of the suite done by an earlier invocation with the same --workdir join the report (a suite can be
    # run in pieces: --runs one one-again one-fp32, then --runs ddp fsdp2-1 fsdp2).
    for name in suite["runs"]:
        if name not in results and (work / f"{name}.json").exists():
            results[name] = json.loads((work / f"{name}.json").read_text())
    results = {name: results[name] for name in suite["runs"] if name in results}
    ok = {k: v for k, v in results.items() if "losses" in v}
    comparisons = {
        name: {"reference": ref, **compare(ok[name], ok[ref])}
        for name, ref in suite["compare"].items()
        if name in ok and ref in ok
    }
    for name, c in comparisons.items():
        c["bf16_effect_max_abs"] = comparisons.get("one-fp32", {}).get("max_abs")
        if c["bf16_effect_max_abs"] is not None and name in JUDGED:
            c["within_bf16_noise"] = c["max_abs"] <= c["bf16_effect_max_abs"]
        c["speedup_vs_reference"] = ok[name]["tokens_per_s"] / ok[c["reference"]]["tokens_per_s"]
        if "one" in ok:
            c["speedup_vs_one"] = ok[name]["tokens_per_s"] / ok["one"]["tokens_per_s"]
    settings = {k: getattr(ARGS, k) for k in ("steps", "warmup", "text_layers", "budget", "lr")}
    report = {"suite": ARGS.suite, "settings": settings, "runs": results, "comparisons": comparisons}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(ok, comparisons)
    print(f"wrote {out}")
    return 0 if all("losses" in results.get(name, {}) for name in runs) else 1


def print_table(runs: dict, comparisons: dict) -> None:
    if not runs:
        return
    first = next(iter(runs.values()))
    env = first["environment"]
    print(
        f"\n{first['parameters'] / 1e9:.2f}B parameters; {', '.join(sorted(set(env['gpus'])))}; torch {env['torch']} "
        f"(CUDA {env['cuda']}, NCCL {env['nccl']}), transformers {env['transformers']}, "
        f"accelerate {env['accelerate']}"
    )
    head = (f"{'run':<10} {'GPUs':>4} {'ms/step':>8} {'tokens/s':>10} {'speedup':>8} {'peak GiB/GPU':>13} {'vs':>8} "
            f"{'max|dloss|':>10} {'mean|dloss|':>11} {'<= bf16 effect':>14}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, r in runs.items():
        c = comparisons.get(name, {})
        speed = f"{c['speedup_vs_one']:.2f}x" if "speedup_vs_one" in c else ""
        peak = "/".join(f"{p:.1f}" for p in r["peak_allocated_gib"])
        within = {True: "yes", False: "NO"}.get(c.get("within_bf16_noise"), "")
        nan = float("nan")
        print(
            f"{name:<10} {r['gpus']:>4} {r['median_step_s'] * 1e3:>8.0f} {r['tokens_per_s']:>10,.0f} {speed:>8} "
            f"{peak:>13} {c.get('reference', ''):>8} {c.get('max_abs', nan):>10.2e} {c.get('mean_abs', nan):>11.2e} "
            f"{within:>14}"
        )
    print("\nwhere a step's time goes, per rank (medians of the timed steps, ms; distributed.StepClock):")
    print(f"  {'run':<10} {'rank':>4} {'wait':>7} {'compute':>8} {'optimizer':>9} {'step':>7} {'tokens':>7} {'images':>6}")
    for name, r in runs.items():
        for t in timeline_summary(r, r.get("warmup", 0)):
            print(
                f"  {name:<10} {t['rank']:>4} {t['wait_ms']:>7.1f} {t['compute_ms']:>8.1f} {t['optimizer_ms']:>9.1f} "
                f"{t['step_ms']:>7.1f} {t['tokens']:>7.0f} {t['images']:>6.0f}"
            )
    print("\nloss per step:")
    for name, r in runs.items():
        print(f"  {name:<10} " + " ".join(f"{x:.4f}" for x in r["losses"]))


ARGS = None

if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.steps is None:
        ARGS.steps = 12 if ARGS.suite == "text-rank" or ARGS.text_rank else 30
    sys.path.insert(0, str(ROOT))
    if ARGS.balance:
        sys.exit(balance())
    if ARGS.worker:
        worker(ARGS.worker)
    else:
        sys.exit(driver())
