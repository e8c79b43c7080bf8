"""The parity check: a patched packed forward+backward equals each sample run alone through the unpatched model.

For one case (family, backend, device, dtype, convention) on a tiny random model:

    out_ref  = each sample alone, unpatched, float64 (CPU) / float32 (GPU)       the oracle
    out_pt   = each sample alone, unpatched, in the test dtype                   plain PyTorch error
    out      = all samples packed in one row, patched, in the test dtype         what we ship

and the flash-attention rule: ``max|out - out_ref| <= k * max|out_pt - out_ref| + floor`` (k from
``qwenvl.tolerances.TOLERANCES``), for logits and for every parameter gradient of a loss that is linear in the logits.
On fp32 CPU the absolute error must also stay under ``model_atol`` (1e-4). MoE families run the yardstick and the
packed row with the oracle's expert choice (``qwenvl.verify.routing``): a top-k that flips under rounding is not
a packing error; how many tokens would have flipped is reported.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from qwenvl.families import get_family
from qwenvl.tolerances import judge, reference_dtype, tolerance
from qwenvl.verify.batches import (
    Sample,
    SampleSpec,
    UpstreamLimit,
    make_sample,
    pack,
    release_run,
    sample_inputs,
    split_by_media,
)
from qwenvl.verify.routing import RoutingPin

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
    logits_err: float
    logits_bound: float
    grad_err: float
    grad_bound: float
    worst_grad: str
    passed: bool
    # MoE families: tokens whose expert choice the packed run (the yardstick) would have made differently from the
    # oracle's, had it not been pinned to it (qwenvl.verify.routing); 0 elsewhere.
    routing_flips: int = 0
    yardstick_routing_flips: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _token_weights(total: int, vocab: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(total, vocab, generator=gen, dtype=torch.float64) / total).to(device)


def _alone(model, samples: Sequence[Sample], weights: torch.Tensor, device):
    """Logits (T, V) and parameter gradients of each sample run alone, unpatched."""
    model.zero_grad(set_to_none=True)
    logits, start = [], 0
    for sample in samples:
        out = model(**sample_inputs(model, sample, device), use_cache=False).logits[0]
        w = weights[start : start + len(sample)].to(out.dtype)
        (out * w).sum().backward()
        logits.append(out.detach())
        start += len(sample)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits), grads


def _packed(model, batches, weights: torch.Tensor, convention: str, backend: str, device, linear_backend: str, compile: bool):
    """Logits (T, V) and parameter gradients of the packed rows, one patched forward each, in order."""
    import qwenvl

    model.zero_grad(set_to_none=True)
    logits, start = [], 0
    with qwenvl.patch(model, backend=backend, linear_backend=linear_backend, compile=compile):
        for batch in batches:
            out = model(**batch.to(device).model_inputs(convention)).logits[0]
            w = weights[start : start + out.shape[0]]
            (out * w.to(out.dtype)).sum().backward()
            logits.append(out.detach())
            start += out.shape[0]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits), grads


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
) -> CaseResult:
    """One case (the module docstring): the oracle, the yardstick and the patched packed rows, judged by the rule."""
    from qwenvl.fixtures import tiny_model
    from qwenvl.patches import active_patch

    if active_patch() is not None:
        raise RuntimeError("run_case needs the unpatched model as its oracle: revert the active qwenvl patch first")
    _refuse_what_cannot_run(family, specs, device, dtype)
    base = tiny_model(family, seed=seed, attn_implementation=attn_implementation, **(model_overrides or {}))
    gen = torch.Generator().manual_seed(seed)
    rows = split_by_media(base.config, [make_sample(base.config, spec, generator=gen) for spec in specs])
    samples = [sample for row in rows for sample in row]  # the order the packed rows give their logits in
    batches = [pack(base, row) for row in rows]
    total = sum(batch.input_ids.shape[1] for batch in batches)
    weights = _token_weights(total, base.config.text_config.vocab_size, seed, device)

    ref_model = _reference_model(base, device, dtype)
    model = base.to(device=device, dtype=dtype)

    def run_alone(m):
        return _alone(m, [_to_dtype(s, m) for s in samples], weights, device)

    pin = _routing_pin(family, base.config)
    with pin.record(ref_model):
        ref_logits, ref_grads = run_alone(ref_model)
    with pin.replay(model):
        pt_logits, pt_grads = run_alone(model)
    pt_flips = pin.flips
    batches = [_batch_to_dtype(batch, dtype) for batch in batches]
    with pin.replay(model):
        logits, grads = _packed(model, batches, weights, convention, backend, device, linear_backend, compile)
    flips = pin.flips

    verdict = _judge(tolerance(device, dtype), (logits, grads), (ref_logits, ref_grads), (pt_logits, pt_grads))
    return CaseResult(
        family=family,
        backend=backend,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        convention=convention,
        tokens=total,
        samples=len(samples),
        **verdict,
        routing_flips=flips,
        yardstick_routing_flips=pt_flips,
    )


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


def _judge(tol, out: tuple, ref: tuple, pt: tuple) -> dict:
    """The rule (``qwenvl.tolerances.judge``) on the logits and every gradient of ``out`` against the oracle ``ref``,
    yardstick ``pt`` (each ``(logits, gradients)``): the worst gradient is the one furthest over (or least under)
    its bound, the later one on a tie; with ``tol.model_atol`` every absolute error must also stay under it. The
    ``CaseResult`` fields of the verdict."""
    (logits, grads), (ref_logits, ref_grads), (pt_logits, pt_grads) = out, ref, pt
    logits_verdict = judge(logits, ref_logits, pt_logits, k=tol.k_out)
    passed = logits_verdict.passed
    grad_err, grad_bound, worst = 0.0, 0.0, ""
    if set(grads) != set(ref_grads):
        passed = False
        worst = f"gradient sets differ: {sorted(set(grads) ^ set(ref_grads))[:3]}"
    for name, ref_grad in ref_grads.items():
        if name not in grads:
            continue
        verdict = judge(grads[name], ref_grad, pt_grads[name], k=tol.k_grad)
        passed = passed and verdict.passed
        if verdict.err - verdict.bound >= grad_err - grad_bound or not worst:
            grad_err, grad_bound, worst = verdict.err, verdict.bound, name
    if tol.model_atol is not None:
        largest = max((judge(grads[n], ref_grads[n], pt_grads[n], k=0).err for n in grads if n in ref_grads), default=0.0)
        passed = passed and logits_verdict.err < tol.model_atol and largest < tol.model_atol
    return {
        "logits_err": logits_verdict.err,
        "logits_bound": logits_verdict.bound,
        "grad_err": grad_err,
        "grad_bound": grad_bound,
        "worst_grad": worst,
        "passed": passed,
    }


def _to_dtype(sample: Sample, model) -> Sample:
    dtype = next(model.parameters()).dtype
    return Sample(
        input_ids=sample.input_ids,
        pixel_values=None if sample.pixel_values is None else sample.pixel_values.to(dtype),
        image_grid_thw=sample.image_grid_thw,
        pixel_values_videos=None if sample.pixel_values_videos is None else sample.pixel_values_videos.to(dtype),
        video_grid_thw=sample.video_grid_thw,
    )


def _batch_to_dtype(batch, dtype):
    moved = copy.copy(batch)
    if batch.pixel_values is not None:
        moved.pixel_values = batch.pixel_values.to(dtype)
    if batch.pixel_values_videos is not None:
        moved.pixel_values_videos = batch.pixel_values_videos.to(dtype)
    return moved
