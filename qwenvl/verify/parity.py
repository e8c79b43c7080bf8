"""The parity check: a patched packed forward+backward equals each sample run alone through the unpatched model.

For one case (family, backend, device, dtype, convention) on a tiny random model:

    out_ref  = each sample alone, unpatched, float64 (CPU) / float32 (GPU)       the oracle
    out_pt   = each sample alone, unpatched, in the test dtype                   plain PyTorch error
    out      = all samples packed in one row, patched, in the test dtype         what we ship

With ``autocast`` (fp32 weights under half-precision autocast, what the Trainer's ``--bf16`` does to a float32
model) the yardstick and the packed row run under the same autocast and are judged by that half dtype's rule.

And the flash-attention rule: ``max|out - out_ref| <= k * max|out_pt - out_ref| + floor`` (k from
``qwenvl.tolerances.TOLERANCES``), for logits and for every parameter gradient of a loss that is linear in the logits.
With ``fused_cross_entropy`` the packed rows train on labels through the fused loss, which keeps no logits: the
loss, the same for all three, is judged in their place (``qwenvl.verify.labelled``).
On fp32 CPU the absolute error must also stay under ``model_atol`` (1e-4). MoE families run the yardstick and the
packed row with the oracle's expert choice (``qwenvl.verify.routing``): a top-k that flips under rounding is not
a packing error; how many tokens would have flipped is reported.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from qwenvl.families import get_family
from qwenvl.options import PatchOptions
from qwenvl.tolerances import reference_dtype, tolerance
from qwenvl.verify.batches import (
    SampleSpec,
    UpstreamLimit,
    make_sample,
    pack,
    release_run,
    split_by_media,
)
from qwenvl.verify.labelled import alone_loss, packed_loss
from qwenvl.verify.plan import AUTOCAST
from qwenvl.verify.routing import RoutingPin
from qwenvl.verify.runs import judge_runs, loss_weights, run_alone, run_packed

__all__ = ["CaseResult", "run_case", "DEFAULT_SPECS"]


# A fixed, varied set for `qwenvl verify`: an image, plain text, a two-group video, one token. Where one forward
# cannot hold images and videos (GLM-4V, whose images and videos share a placeholder; Qwen3-Omni on 4.57) it runs as
# two packed rows: the image samples, then the others (``split_by_media``).
DEFAULT_SPECS = (
    SampleSpec(text=9, image=(4, 4)),
    SampleSpec(text=23),
    SampleSpec(text=5, video=(2, 4, 6)),
    SampleSpec(text=1),
    SampleSpec(text=12, image=(2, 6)),
)


@dataclass
class CaseResult:
    family: str
    backend: str
    device: str
    dtype: str
    convention: str
    tokens: int
    samples: int
    logits_err: float | None  # None where the loss is judged instead (fused_cross_entropy)
    logits_bound: float | None
    grad_err: float
    grad_bound: float
    worst_grad: str
    passed: bool
    # MoE families: tokens whose expert choice the packed run (the yardstick) would have made differently from the
    # oracle's, had it not been pinned to it (qwenvl.verify.routing); 0 elsewhere.
    routing_flips: int = 0
    yardstick_routing_flips: int = 0
    why: str = ""  # what failed (qwenvl.verify.runs.judge_runs), empty when passed
    loss_err: float | None = None  # fused_cross_entropy: the loss, judged in the logits' place
    loss_bound: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def run_case(
    family: str,
    *,
    backend: str = "sdpa",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    convention: str = "upstream",
    specs: Sequence[SampleSpec] = DEFAULT_SPECS,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    model_overrides: dict | None = None,
    linear_backend: str = "auto",
    compile: bool = False,
    fused_cross_entropy: bool = False,
    autocast: torch.dtype | None = None,
) -> CaseResult:
    """One case (the module docstring): the oracle, the yardstick and the patched packed rows, judged by the rule;
    the packed side is patched with ``backend``, ``linear_backend``, ``compile`` and ``fused_cross_entropy``.
    ``autocast``: the model in ``dtype`` (float32) and both sides under ``torch.autocast`` to this half dtype."""
    from qwenvl.fixtures import tiny_model
    from qwenvl.patches import active_patch

    if active_patch() is not None:
        raise RuntimeError("run_case needs the unpatched model as its oracle: revert the active qwenvl patch first")
    _refuse_what_cannot_run(family, specs, device, dtype)
    if autocast is not None:
        if dtype != torch.float32:
            raise ValueError(f"autocast runs a float32 model, got dtype={dtype}")
        if why := get_family(family).release_bug("autocast"):
            raise UpstreamLimit(why)
    base = tiny_model(family, seed=seed, attn_implementation=attn_implementation, **(model_overrides or {}))
    gen = torch.Generator().manual_seed(seed)
    rows = split_by_media(base.config, [make_sample(base.config, spec, generator=gen) for spec in specs])
    batches = [pack(base, row) for row in rows]  # the samples alone run in this order too
    ref_model = _reference_model(base, device, dtype)
    model = base.to(device=device, dtype=dtype)
    options = PatchOptions(
        backend=backend, linear_backend=linear_backend, compile=compile, fused_cross_entropy=fused_cross_entropy
    )
    alone, packed = _runs(base, batches, seed, convention, device, options)
    pin = _routing_pin(family, base.config)
    with pin.record(ref_model):
        ref = alone(ref_model)
    half = functools.partial(torch.autocast, torch.device(device).type, dtype=autocast) if autocast else contextlib.nullcontext
    with pin.replay(model), half():
        try:
            pt = alone(model)
        except Exception as exc:
            if autocast is None:
                raise
            # the unpatched model cannot run under this autocast at all (a kernel without an autocast rule, say):
            # a limit of the release and device, not of the patch
            raise UpstreamLimit(f"the unpatched {family} fails under {autocast} autocast on {device}: {type(exc).__name__}: {exc}") from exc
    pt_flips = pin.flips
    yardsticks = [pt]
    if compile:  # the compiled way, done plainly: the unpatched model's regions compiled, each sample alone
        with pin.replay(model), half(), _compiled_unpatched(model, family):
            yardsticks.append(alone(model))
    with pin.replay(model), half(), _really_compiled(compile):
        out = packed(model)
    flips = pin.flips

    verdict = judge_runs(tolerance(device, autocast or dtype), out, ref, yardsticks)
    return CaseResult(
        family=family,
        backend=backend,
        device=str(device),
        dtype=(AUTOCAST + str(autocast) if autocast else str(dtype)).replace("torch.", ""),  # qwenvl verify's names
        convention=convention,
        tokens=sum(batch.input_ids.shape[1] for batch in batches),
        samples=sum(len(batch.items) for batch in batches),
        **_judged_output(verdict, fused_cross_entropy),
        grad_err=verdict.grad_err,
        grad_bound=verdict.grad_bound,
        worst_grad=verdict.worst_grad,
        passed=verdict.passed,
        why=verdict.why,
        routing_flips=flips,
        yardstick_routing_flips=pt_flips,
    )


@contextlib.contextmanager
def _compiled_unpatched(model, family: str):
    """The unpatched model with the regions ``compile=True`` compiles (nothing else of the patch), undone after.

    Its run of the samples alone is the compiled case's second yardstick: the same maths done plainly, in the
    compiled way. Inductor rounds a region's fused elementwise work once where eager rounds after every op, so a
    compiled run's error is another draw than the eager yardstick's. For the logits (thousands of elements,
    the rule takes their maximum) that changes little; for the fused loss's one scalar it decides the verdict:
    two independent draws differ by more than k = 2 about three times in ten (measured on Qwen3.5-MoE in
    bfloat16 on the CPU: 2 of 3 seeds failed against the eager yardstick alone, with every gradient within a
    hundredth of its bound). Against this yardstick too, a packing error still shows: it is not in either."""
    from qwenvl.patches._compile import compile_regions
    from qwenvl.patches._handle import PatchRecorder

    spec = get_family(family)
    recorder = PatchRecorder()
    compile_regions(model, recorder, spec=spec)
    try:
        yield
    finally:
        recorder.undo()


@contextlib.contextmanager
def _really_compiled(compile: bool):
    """A compiled case runs compiled, or fails. torch.compile falls back to eager, with one logged warning, once a
    code object has been compiled ``recompile_limit`` times (8) in the process: before each region class had its
    own code (``qwenvl.patches._compile._with_own_code``) the third family of ``qwenvl verify --compile`` ran
    eagerly and was judged as compiled. Each compiled case starts from empty dynamo caches, as a fresh process
    would, runs with hitting the limit an error, and must compile at least one graph and leave no frame eager."""
    if not compile:
        yield
        return
    from qwenvl.patches._compile import compile_stats

    torch._dynamo.reset()
    before = compile_stats()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    after = compile_stats()
    if after["graphs"] == before["graphs"] or after["not_compiled"] != before["not_compiled"]:
        raise RuntimeError(f"compile=True, but the packed run did not run compiled: {before} -> {after}")


def _runs(base, batches, seed: int, convention: str, device, options: PatchOptions):
    """How each side runs, as functions of the model: the samples alone, unpatched; the packed rows, patched with
    ``options``. The loss is linear in the logits (random weights from ``seed``), or, with the fused loss, the
    labelled loss (``qwenvl.verify.labelled``)."""
    if options.fused_cross_entropy:
        alone = functools.partial(alone_loss, rows=batches, convention=convention, device=device)
        packed = functools.partial(packed_loss, rows=batches, convention=convention, device=device, options=options)
        return alone, packed
    total = sum(batch.input_ids.shape[1] for batch in batches)
    weights = loss_weights(total, base.config.text_config.vocab_size).to(device)
    alone = functools.partial(run_alone, rows=batches, weights=weights, device=device)
    packed = functools.partial(
        run_packed, rows=batches, weights=weights, convention=convention, device=device, options=options
    )
    return alone, packed


def _judged_output(verdict, fused_cross_entropy: bool) -> dict:
    """The ``CaseResult`` fields of what is judged besides the gradients: the logits, or the loss in their place."""
    if fused_cross_entropy:
        return {
            "logits_err": None, "logits_bound": None, "loss_err": verdict.logits_err, "loss_bound": verdict.logits_bound
        }
    return {"logits_err": verdict.logits_err, "logits_bound": verdict.logits_bound}


def _refuse_what_cannot_run(family: str, specs: Sequence[SampleSpec], device, dtype: torch.dtype) -> None:
    """``UpstreamLimit`` naming the transformers bug where this release cannot run the case at all (its videos, its
    float64 oracle: ``release_run``); ``qwenvl verify``'s plan has already left such cases out."""
    left_out = release_run(family, specs, float64=reference_dtype(device, dtype) == torch.float64).left_out
    if left_out:
        raise UpstreamLimit(next(iter(left_out.values())))


def _routing_pin(family: str, config) -> RoutingPin:
    """MoE families: the yardstick and the packed run take the oracle's expert choice (``qwenvl.verify.routing``);
    with no MoE block the pin intercepts nothing."""
    moe_block = get_family(family).moe_block
    return RoutingPin(() if moe_block is None else (moe_block,), getattr(config.text_config, "num_experts_per_tok", 0))


def _reference_model(base, device, dtype: torch.dtype):
    """A copy of ``base`` in the oracle's dtype (``reference_dtype``: float64 on the CPU)."""
    ref_model = copy.deepcopy(base).to(device=device, dtype=reference_dtype(device, dtype))
    if reference_dtype(device, dtype) == torch.float64 and hasattr(ref_model, "set_experts_implementation"):
        # transformers 5.x runs MoE experts through grouped_mm, which has no float64 kernel.
        ref_model.set_experts_implementation("eager")
    return ref_model
