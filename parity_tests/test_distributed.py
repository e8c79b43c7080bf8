"""Data-parallel training on CPU: two processes on gloo against one process with the same global batch.

Here, in one process: the per-rank packer (properties), the step sampler dealt out the way accelerate deals
batches, the vision dummy pass on every family, the guards. Under ``torchrun --nproc_per_node 2`` (this file is
also the worker script, see ``_worker``): ``qwenvl train`` (``qwenvl.train.run.run``) with DDP, resumed from its
checkpoint, and with FSDP2; the data file puts the only image sample on rank 0, so rank 1 trains text only.

Tolerance: none; the two runs must agree bit for bit. Why that is what fp32 allows:
  - the same rows reach each optimizer step (rows packed for 2 shards in both; the one process accumulates 2
    micro-batches, rank r's row being its r-th), and each micro-batch runs the same kernels on the same shapes
    with one thread (torchrun sets OMP_NUM_THREADS=1; the reference sets torch.set_num_threads(1));
  - a rank's loss is its label-token sum over the global label count times 2 (transformers scales by the world
    size when it averages tokens across devices). Scaling by a power of two is exact, and every backward
    operation is linear in the incoming gradient with rounding that commutes with such a scale, so rank r's
    gradients are exactly twice micro-batch r's;
  - DDP sums the two ranks' gradients and halves them: fl(2a + 2b) / 2 = fl(a + b), the one process's
    ``grad = a; grad += b`` (two terms: order cannot matter). The text-only rank's vision gradients are exact
    zeros (the dummy pass), so fl(2a + 0) / 2 = a, the one process's a (its text micro-batch adds nothing);
  - in a step where neither rank has an image, the dummy's zero gradients are set to None before clipping,
    so the gradient norm, the clip coefficient and the AdamW update see the same tensors as the one process.
FSDP2 reduce-scatters the same two-term sums, halved, and AdamW works elementwise on the shards: the same bits,
except the clip norm, which FSDP2 forms from per-shard norms (another summation order; measured with clipping
on: gradients within 5e-8 and weights within 6e-7 after 4 steps). So the FSDP2 run has clipping off, and is
compared bit for bit with a one-process run without clipping.

What CPU cannot show as on GPUs: accelerate turns FSDP on only for GPU-like devices (``_allow_fsdp_on_cpu`` lets
the test past that, and nothing else); FULL_STATE_DICT checkpoints fail on CPU (so the test saves sharded ones);
on transformers 4.57 ``--fsdp``, and before 5.18 a DDP resume, cannot run on CPU at all (skipped there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]

# The worker's flags: 4 optimizer steps of 2 rows (one per rank), a checkpoint at step 2.
FLAGS = [
    "--model_max_length", "128", "--max_steps", "4", "--save_steps", "2", "--seed", "0", "--disable_tqdm", "True",
    "--learning_rate", "3e-3", "--mm_projector_lr", "1e-3", "--vision_tower_lr", "5e-4", "--tune_mm_vision", "True",
    "--use_cpu", "True", "--report_to", "none", "--logging_steps", "1", "--per_device_train_batch_size", "1",
]  # fmt: skip
LRS = {"base": 3e-3, "vision": 5e-4, "projector": 1e-3}


def _transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


# transformers before 5.18 loads a checkpoint's optimizer with map_location=args.device, which is "cpu:0" in a CPU
# process group, and torch.load refuses that location; on GPUs it is "cuda:N" and works (5.18 maps CPU to "cpu").
_RESUMES_ON_CPU = _transformers_at_least("5.18.0")
# transformers 4.57 hands --fsdp to accelerate through environment variables, and accelerate's plugin built from
# them raises on a machine without GPUs ("no available devices"); 5.x passes the plugin, which the shim reaches.
_FSDP_ON_CPU = _transformers_at_least("5.0.0")



# ---------------------------------------------------------------------------------------------------------
# The per-rank packer and the step sampler


def _check_sharded(lengths, budget, shards, seed):
    from qwenvl.data import pack, pack_shards, shard_by_tokens

    packing = pack_shards(lengths, budget, shards, seed=seed)
    assert all(len(step) == shards for step in packing.steps), "every step has a row for every rank"
    assert all(row and sum(lengths[i] for i in row) <= budget for row in packing.rows)
    shard_of = {i: r for r, shard in enumerate(shard_by_tokens(lengths, shards, seed=seed)) for i in shard}
    for step in packing.steps:
        for r, row in enumerate(step):
            assert all(shard_of[i] == r for i in row), "a rank trains only on its own shard"
    placed = sorted(i for row in packing.rows for i in row)
    assert sorted(set(placed)) == list(range(len(lengths))), "every sample at least once"
    copies = Counter(packing.rows)
    assert packing.repeated == sum(n - 1 for n in copies.values()), "repeats are whole rows, counted"
    assert len(placed) - len(lengths) == sum((n - 1) * len(row) for row, n in copies.items())
    if packing.repeated == 0:
        assert len(placed) == len(lengths)
        per_rank = packing.rank_tokens()
        assert max(per_rank) - min(per_rank) <= max(lengths), "greedy balance: within one sample"
    assert pack_shards(lengths, budget, shards, seed=seed) == packing, "deterministic for a seed"
    if shards == 1:  # first-fit-decreasing, as pack: the same rows up to which of equal samples goes where

        def shape(rows):
            return sorted(sorted(lengths[i] for i in row) for row in rows)

        assert shape(packing.rows) == shape(pack(lengths, budget, seed=seed).rows)
    return packing


@given(
    lengths=st.lists(st.integers(1, 64), min_size=8, max_size=80),
    budget=st.integers(64, 200),
    shards=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@example(lengths=[9, 8, 7, 6, 5, 4, 3], budget=16, shards=2, seed=0)  # the docstring's example
@example(lengths=[64] * 8, budget=64, shards=3, seed=0)  # one sample per row: rows repeat
@example(lengths=[1] * 8, budget=64, shards=4, seed=0)  # one row per shard: split to give each rank its row
def test_pack_shards_invariants(lengths, budget, shards, seed):
    _check_sharded(lengths, budget, shards, seed)


def test_pack_shards_docstring_example_and_report():
    from qwenvl.data import pack_shards

    packing = pack_shards([9, 8, 7, 6, 5, 4, 3], 16, 2)
    a, b, c, d, e, f, g = range(7)
    assert sorted(packing.steps) == sorted((((a, d), (b, c)), ((e,), (f, g))))
    assert packing.rank_tokens() == [20, 22]
    assert packing.imbalance == pytest.approx(22 / 21 - 1)
    assert packing.step_wait == pytest.approx((15 + 7) / (15 + 6) - 1)
    assert "tokens per rank [20, 22] (imbalance 4.76%, per-step wait 4.76%)" in packing.summary()
    with pytest.raises(ValueError, match="too few to give each of 3 ranks a row"):
        pack_shards([4, 4], 16, 3)


class _Lengths(torch.utils.data.Dataset):
    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return i


def test_step_sampler_deals_each_rank_its_own_rows():
    """Dealt out as accelerate deals batches (round robin, BatchSamplerShard), rank r gets exactly its rows."""
    from accelerate.data_loader import BatchSamplerShard

    from qwenvl.data import PackedDataset

    gen = torch.Generator().manual_seed(0)
    rows = PackedDataset(_Lengths(torch.randint(1, 60, (50,), generator=gen).tolist()), 128, seed=3, shards=2)
    sampler = rows.step_sampler(seed=7)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = torch.utils.data.BatchSampler(sampler, batch_size=1, drop_last=False)
        dealt = [[b[0] for b in BatchSamplerShard(batches, num_processes=2, process_index=r)] for r in (0, 1)]
        assert len(dealt[0]) == len(dealt[1]) == len(rows.packing.steps)
        for r in (0, 1):
            assert all(k % 2 == r for k in dealt[r]), "rank r gets item s * 2 + r: its own row of step s"
        assert [k // 2 for k in dealt[0]] == [k // 2 for k in dealt[1]], "the ranks take the same step together"
        orders.append(dealt[0])
    assert orders[0] != orders[1], "a new step order every epoch"
    sampler.set_epoch(0)
    assert [k for k in sampler][::2] == orders[0], "the order depends only on the seed and the epoch"
    assert rows[orders[0][0]] == list(rows.packing.steps[orders[0][0] // 2][0])


# ---------------------------------------------------------------------------------------------------------
# The vision dummy pass, one process


def _family_params():
    from qwenvl.families import FAMILIES, available_families

    # Hybrid (Gated DeltaNet) families run their text layers on torch's reference kernels here: seconds per
    # step, so they run with the slow tests. The dummy pass touches only the vision tower and the entry.
    return [
        pytest.param(name, marks=[pytest.mark.slow] if FAMILIES[name].linear_attention else [])
        for name in available_families()
    ]


def _dummy_step(family, specs, modalities):
    """One packed forward and backward of ``family``'s tiny model (a VisionDummy on it if ``modalities``)."""
    import qwenvl
    from qwenvl.fixtures import tiny_model
    from qwenvl.train.distributed import VisionDummy
    from qwenvl.verify.batches import SampleSpec, make_sample, pack

    model = tiny_model(family, seed=0).train()
    gen = torch.Generator().manual_seed(0)
    samples = [make_sample(model.config, SampleSpec(**spec), generator=gen) for spec in specs]
    dummy = VisionDummy(model, modalities) if modalities else None
    try:
        with qwenvl.patch(model):
            inputs = pack(model, samples).model_inputs()
            out = model(**inputs, labels=inputs["input_ids"])
            out.loss.backward()
    finally:
        if dummy is not None:
            dummy.remove()
    return out.loss.detach(), out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}, dummy


@pytest.mark.parametrize("family", _family_params())
def test_dummy_vision_pass_adds_exactly_zero(family):
    """Text-only batch: with the dummy pass the loss, the logits and every gradient are bitwise those without
    it, and every vision / projector parameter has a gradient of exact zeros (so DDP sees it used); nothing
    else changes which parameters have gradients (an MoE expert no token reaches, Qwen3-Omni's audio tower)."""
    text = [{"text": 9}, {"text": 6}]
    loss, logits, grads, _ = _dummy_step(family, text, None)
    loss_d, logits_d, grads_d, dummy = _dummy_step(family, text, ("image", "video"))
    assert torch.equal(loss, loss_d) and torch.equal(logits, logits_d)
    assert dummy.dummy_passes == {"image": 1, "video": 1}
    unused = {n for n, g in grads.items() if g is None}
    assert {n for n, g in grads_d.items() if g is None} == {n for n in unused if "visual" not in n}
    assert any("visual" in n for n in unused), "without the dummy pass the vision tower is unused"
    for name, grad in grads.items():
        if grad is not None:
            assert torch.equal(grad, grads_d[name]), name
        elif "visual" in name:
            assert not grads_d[name].any(), name


def test_dummy_vision_pass_only_for_missing_modalities():
    """A batch with an image runs no image dummy pass (and a video one only if the data holds videos)."""
    mixed = [{"text": 5, "image": (4, 4)}, {"text": 6}]
    _, _, grads, dummy = _dummy_step("qwen2_5_vl", mixed, ("image",))
    assert dummy.dummy_passes == {"image": 0, "video": 0} and dummy.take_real_count() == 1
    _, _, grads_v, dummy = _dummy_step("qwen2_5_vl", mixed, ("image", "video"))
    assert dummy.dummy_passes == {"image": 0, "video": 1}
    assert all(torch.equal(g, grads_v[n]) for n, g in grads.items()), "the video pass adds exactly zero"


def test_dummy_vision_pass_on_only_when_asked_or_distributed(tmp_path):
    from qwenvl.fixtures import tiny_model
    from qwenvl.train.argument import TrainingArguments
    from qwenvl.train.trainer import QwenVLTrainer

    class Videos(list):
        modalities = ("video",)

    def trainer(**kw):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)
        return QwenVLTrainer(model=tiny_model("qwen2_vl"), args=args, train_dataset=Videos([{}]))

    assert trainer().vision_dummy is None, "one process: off"
    on = trainer(dummy_vision_pass=True)
    assert on.vision_dummy is not None and on.vision_dummy.modalities == ("video",), "the data's modalities"
    on.vision_dummy.remove()


def test_missing_optimizer_state_is_filled_as_the_optimizer_would():
    """The fill (for FSDP2 checkpoints) gives AdamW exactly its lazy state: later steps are unchanged."""
    from qwenvl.train.trainer import _fill_missing_optimizer_state

    def run(fill):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
        opt = torch.optim.AdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}], weight_decay=0.1)
        a.grad = torch.randn(5)
        opt.step()
        before = b.detach().clone()
        if fill:
            assert _fill_missing_optimizer_state(opt) == 1
            assert torch.equal(b.detach(), before) and b.grad is None and a.grad is not None
            assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
            assert float(opt.state[b]["step"]) == 0 and not opt.state[b]["exp_avg"].any()
        for _ in range(2):
            a.grad, b.grad = torch.randn(5), torch.randn(3)
            opt.step()
        return a.detach(), b.detach()

    plain, filled = run(False), run(True)
    assert all(torch.equal(x, y) for x, y in zip(plain, filled))


def test_flattened_fsdp1_parameters_refused_with_component_lrs(tmp_path):
    from qwenvl.fixtures import tiny_model
    from qwenvl.train.argument import TrainingArguments
    from qwenvl.train.trainer import QwenVLTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], vision_tower_lr=1e-5)
    trainer = QwenVLTrainer(model=tiny_model("qwen2_vl"), args=args)
    flat = torch.nn.Module()
    flat.register_parameter("_flat_param", torch.nn.Parameter(torch.zeros(4)))
    with pytest.raises(ValueError, match="FSDP1 without use_orig_params flattened"):
        trainer.create_optimizer(flat)


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.json", 2), ("deepspeed_zero3.json", 3)])
def test_deepspeed_examples_keep_component_lrs(name, stage):
    """No optimizer or scheduler block: transformers builds the optimizer from our groups (ZeRO partitions
    it) and its own scheduler, so per-component learning rates hold; adding a block is refused."""
    from qwenvl.train.trainer import check_deepspeed_config

    config = json.loads((ROOT / "examples" / name).read_text())
    assert config["zero_optimization"]["stage"] == stage
    assert "optimizer" not in config and "scheduler" not in config
    lrs = types.SimpleNamespace(mm_projector_lr=1e-4, vision_tower_lr=2e-6)
    assert check_deepspeed_config(config, lrs) is False
    assert check_deepspeed_config(str(ROOT / "examples" / name), lrs) is False
    with pytest.raises(ValueError, match="Remove the 'optimizer' block"):
        check_deepspeed_config({**config, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, lrs)


def test_fsdp2_examples():
    import yaml

    config = yaml.safe_load((ROOT / "examples" / "accelerate_fsdp2.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert json.loads((ROOT / "examples" / "fsdp2.json").read_text())["version"] == 2


# ---------------------------------------------------------------------------------------------------------
# Two processes on gloo against one


def _two_processes(out: Path) -> types.SimpleNamespace:
    """The worker under torchrun, then the one-process references: each phase's JSON and rank 0's tensors."""
    _write_data(out / "data.json")
    (out / "spec.json").write_text(json.dumps({"out": str(out), "data": str(out / "data.json")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # One thread per rank, as the reference below: torchrun sets OMP_NUM_THREADS=1 only where it is unset, and a
    # second thread changes the summation order of some CPU kernels (measured: the
    # embedding's gradient differed with 2 threads per rank on transformers 4.57.6).
    env["OMP_NUM_THREADS"] = "1"
    # A CPU test on every machine: on a CUDA box the Trainer would put each rank on cuda:0 while gloo and the
    # one-process references stay on the CPU ("Calculated loss must be on the original device").
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).resolve()), str(out / "spec.json")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = {path.stem: torch.load(path) for path in out.glob("*.pt")}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1: the same kernels, the same bits
    try:
        # rows packed for 2 ranks, 2 micro-batches per step: the 2 ranks' global batch, rank r's row r-th
        one = [*FLAGS, "--data_path", str(out / "data.json"), "--save_strategy", "no"]
        one += ["--pack_shards", "2", "--gradient_accumulation_steps", "2"]
        reference = {}
        runs = (("clipped", []), ("unclipped", ["--max_grad_norm", "0"])) if _FSDP_ON_CPU else (("clipped", []),)
        for name, extra in runs:
            reference[name] = _train(["--output_dir", str(out / f"one-{name}"), *one, *extra])
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(ranks=ranks, tensors=tensors, reference=reference, log=proc.stdout + proc.stderr)


def _check_bit_for_bit(two, phase: str, reference: str) -> None:
    """Every step's gradients and the final weights equal the one process's; each rank's loss is twice (the
    world size) its micro-batch's there; rank 1 never saw an image and ran the dummy pass every time."""
    _, recorder = two.reference[reference]
    run = two.tensors[phase]
    assert len(run["grads"]) == len(recorder.grads) == 4
    for step, (grads, expected) in enumerate(zip(run["grads"], recorder.grads)):
        assert grads.keys() == expected.keys(), f"{phase} step {step}: the same parameters have gradients"
        for name in grads:
            assert torch.equal(grads[name], expected[name]), f"{phase} step {step}: {name}"
    assert run["weights"].keys() == recorder.weights.keys()
    for name, weight in run["weights"].items():
        assert torch.equal(weight, recorder.weights[name]), f"{phase}: {name}"
    one = [m["loss"] for m in recorder.micro]
    for r, rank in enumerate(two.ranks):
        assert [m["loss"] for m in rank[phase]["micro"]] == [2 * x for x in one[r::2]], f"{phase} rank {r}"
    micro0, micro1 = two.ranks[0][phase]["micro"], two.ranks[1][phase]["micro"]
    assert [m["pixels"] for m in micro1] == [False] * 4 and micro1[-1]["dummy_passes"] == {"image": 4, "video": 0}
    assert sum(m["pixels"] for m in micro0) == 1 and micro0[-1]["dummy_passes"] == {"image": 3, "video": 0}


def _check_lrs_and_report(two, phase: str) -> None:
    _, recorder = two.reference["clipped"]
    for rank in two.ranks:
        groups = rank[phase]["groups"]
        assert [name for name, _ in groups] == [g for g, _ in recorder.groups], phase
        assert all(lr == LRS[name.split("_")[0]] for name, lr in groups), (phase, groups)
        assert rank[phase]["report"] == recorder.report, f"{phase}: the report (FSDP2 shards at full size)"
    assert "trainable parameters: 188,896 of 188,896" in recorder.report


def _check_resume(two, phase: str) -> None:
    whole, resumed = two.tensors[phase], two.tensors[f"{phase}_resumed"]
    for name, weight in whole["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), f"{phase} resumed: {name}"
    losses = [m["loss"] for m in two.ranks[0][phase]["micro"]]
    assert [m["loss"] for m in two.ranks[0][f"{phase}_resumed"]["micro"]] == losses[2:], f"{phase} resumed"


def _check_lora(two) -> None:
    """The PEFT-wrapped model trained under DDP (find_unused_parameters off) with rank 1 text only; the report
    counts the vision tower once (PEFT's frozen original beside the trained copy is left frozen)."""
    assert [len(rank["ddp_lora"]["micro"]) for rank in two.ranks] == [2, 2]
    assert two.ranks[1]["ddp_lora"]["micro"][-1]["dummy_passes"]["image"] == 2
    report = two.ranks[0]["ddp_lora"]["report"]
    blocks = [line for line in report.splitlines() if line.strip().startswith("vision blocks")]
    assert blocks and "21,184 /" in blocks[0], report


def _check_packing_report(two) -> None:
    report = two.ranks[0]["ddp"]["ranks"]
    metrics, _ = two.reference["clipped"]
    assert report == metrics["ranks"], "one process packing for 2 shards packs the same rows"
    assert report["shards"] == 2 and report["steps"] == 4 and report["repeated_rows"] == 0
    assert sum(report["rank_tokens"]) == 817
    assert report["imbalance"] == pytest.approx(max(report["rank_tokens"]) / (817 / 2) - 1)
    assert f"tokens per rank {report['rank_tokens']} (imbalance {100 * report['imbalance']:.2f}%" in two.log


@pytest.mark.slow
def test_two_processes_on_gloo_equal_one_process(tmp_path):
    """One test (one torchrun, also under pytest-xdist) for every two-process check; see the module docstring.
    On transformers 4.57 the FSDP2 checks, and before 5.18 the resume checks, cannot run on CPU and are left out."""
    pytest.importorskip("accelerate", reason="the Trainer needs the 'train' extra (accelerate)")
    two = _two_processes(tmp_path)
    _check_bit_for_bit(two, "ddp", "clipped")
    _check_lrs_and_report(two, "ddp")
    _check_lora(two)
    _check_packing_report(two)
    refusals = two.ranks[0]["refusals"]
    assert "mixed torch.Tensor and DTensor" in refusals["outside_forward"]
    if _FSDP_ON_CPU:
        assert "--fsdp was given but accelerate did not turn FSDP on" in refusals["cpu_fsdp"]
        _check_bit_for_bit(two, "fsdp2", "unclipped")
        _check_lrs_and_report(two, "fsdp2")
    if _RESUMES_ON_CPU:
        _check_resume(two, "ddp")
    if _RESUMES_ON_CPU and _FSDP_ON_CPU:
        _check_resume(two, "fsdp2")


# ---------------------------------------------------------------------------------------------------------
# The worker (torchrun runs this file): one JSON spec in, per-rank JSON and rank 0's tensors out.


def _write_data(path: Path) -> None:
    """The demo's two-image sample (the longest: sharding puts it on rank 0 first) and three variants of each of
    its text-only samples (sharding fills rank 1 with them first): rank 1 never sees an image."""
    from qwenvl.fixtures import demo_data_path

    rows = json.loads(demo_data_path().read_text())
    folder = demo_data_path().parent
    image = next(r for r in rows if isinstance(r.get("image"), list))
    image = {**image, "image": [str(folder / p) for p in image["image"]]}
    text = []
    for copy, extra in enumerate(("", " Indeed.", " That is all.")):
        for row in (r for r in rows if "image" not in r and "video" not in r):
            turns = [dict(t) for t in row["conversations"]]
            turns[-1]["value"] += extra
            text.append({**row, "conversations": turns})
    path.write_text(json.dumps([image, *text]))


class _Recorder:
    """Callbacks and a training_step wrapper recording what each rank did, per micro-batch and per step."""

    def __init__(self):
        from transformers import TrainerCallback

        self.micro: list[dict] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.report: str | None = None
        self.groups: list[tuple[str, float]] = []
        recorder = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                from qwenvl.train.report import trainable_report

                recorder.report = trainable_report(model).format()

            def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
                grads = {name: _full(p.grad) for name, p in model.named_parameters() if p.grad is not None}
                recorder.grads.append(grads)
                recorder.groups = [(g["name"], g["initial_lr"]) for g in optimizer.param_groups]

            def on_train_end(self, args, state, control, model=None, **kwargs):
                recorder.weights = {name: _full(p) for name, p in model.named_parameters()}

        self.callback = Callback()

    def wrap(self, trainer_cls):
        original = trainer_cls.training_step
        recorder = self

        def training_step(trainer, model, inputs, *args, **kwargs):
            loss = original(trainer, model, inputs, *args, **kwargs)
            dummy = trainer.vision_dummy
            recorder.micro.append(
                {
                    "loss": float(loss),
                    "pixels": "pixel_values" in inputs,
                    "dummy_passes": dict(dummy.dummy_passes) if dummy is not None else None,
                }
            )
            return loss

        trainer_cls.training_step = training_step
        return original


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor (an FSDP2 shard is gathered: every rank must call this)."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def _train(argv: list[str]) -> tuple[dict, _Recorder]:
    from transformers import HfArgumentParser

    from qwenvl.train.argument import TrainingArguments
    from qwenvl.train.run import DataArguments, ModelArguments, run
    from qwenvl.train.trainer import QwenVLTrainer

    model_args, data_args, training_args = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments)
    ).parse_args_into_dataclasses(args=argv)
    recorder = _Recorder()
    original = recorder.wrap(QwenVLTrainer)
    try:
        metrics = run(model_args, data_args, training_args, callbacks=[recorder.callback])
    finally:
        QwenVLTrainer.training_step = original
    return metrics, recorder


def _allow_fsdp_on_cpu() -> None:
    """accelerate (1.15, state.py) turns FSDP on only for GPU-like distributed types, never MULTI_CPU, and
    drops the plugin without a word; torch's FSDP2 itself runs on gloo. This lets the test reach it."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__


def _fsdp_refusal(out: Path) -> dict:
    """Without the shim, --fsdp on CPU is refused by QwenVLTrainer (not silently run as DDP)."""
    from accelerate.state import AcceleratorState

    from qwenvl.fixtures import tiny_model
    from qwenvl.train.argument import TrainingArguments
    from qwenvl.train.trainer import QwenVLTrainer

    found = {}
    if not _FSDP_ON_CPU:
        return found
    args = TrainingArguments(
        output_dir=str(out / "refused"), use_cpu=True, report_to=[], fsdp="full_shard",
        fsdp_config=str(ROOT / "examples" / "fsdp2.json"),
    )  # fmt: skip
    try:
        QwenVLTrainer(model=tiny_model("qwen2_5_vl"), args=args)
    except ValueError as exc:
        found["cpu_fsdp"] = str(exc)
    AcceleratorState._reset_state()
    return found


def _vision_outside_forward() -> str:
    """Under FSDP2 a vision call from outside the root forward fails: why the dummy pass runs inside it."""
    from torch.distributed.fsdp import fully_shard

    from qwenvl.fixtures import tiny_model

    model = tiny_model("qwen2_5_vl")
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module)
    fully_shard(model)
    vision = model.config.vision_config
    pixels = torch.zeros(4, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)
    try:
        model.model.get_image_features(pixels, torch.tensor([[1, 2, 2]]))
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    rank = int(os.environ["RANK"])
    common = [*FLAGS, "--data_path", spec["data"], "--ddp_backend", "gloo", "--ddp_timeout", "120"]
    # DDP without its unused-parameter search (transformers' choice under checkpointing): the dummy pass must do.
    strict = ["--ddp_find_unused_parameters", "False"]
    result: dict = {}

    def phase(name: str, extra: list[str]) -> None:
        metrics, recorder = _train(["--output_dir", str(out / name), *common, *extra])
        result[name] = {
            "micro": recorder.micro,
            "groups": recorder.groups,
            "report": recorder.report,
            "ranks": metrics.get("ranks"),
            "packing": metrics.get("packing"),
        }
        if rank == 0:
            torch.save({"grads": recorder.grads, "weights": recorder.weights}, out / f"{name}.pt")

    phase("ddp", strict)
    # PEFT (LoRA, the vision tower in modules_to_save) with activation checkpointing: DDP without
    # find_unused_parameters must see every trainable parameter used, on the text-only rank too.
    lora = ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--gradient_checkpointing", "True"]
    phase("ddp_lora", [*strict, *lora, "--max_steps", "2", "--save_strategy", "no"])
    if _RESUMES_ON_CPU:
        phase("ddp_resumed", [*strict, "--resume_from_checkpoint", str(out / "ddp" / "checkpoint-2")])
    result["refusals"] = {**_fsdp_refusal(out), "outside_forward": _vision_outside_forward()}
    if not _FSDP_ON_CPU:
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        return
    _allow_fsdp_on_cpu()
    # examples/fsdp2.json with sharded checkpoints: on CPU, FULL_STATE_DICT's gather hands safetensors views of
    # FSDP2's freed all-gather buffer ("invalid python storage"); on GPUs the CPU offload copies them.
    config = {**json.loads((ROOT / "examples" / "fsdp2.json").read_text()), "state_dict_type": "SHARDED_STATE_DICT"}
    (out / "fsdp2.json").write_text(json.dumps(config))
    # Clipping off: FSDP2 forms the gradient norm from per-shard norms (another summation order).
    fsdp = ["--fsdp", "full_shard", "--fsdp_config", str(out / "fsdp2.json"), "--max_grad_norm", "0"]
    phase("fsdp2", fsdp)
    if _RESUMES_ON_CPU:
        phase("fsdp2_resumed", [*fsdp, "--resume_from_checkpoint", str(out / "fsdp2" / "checkpoint-2")])
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1])
