"""Fused linear cross-entropy (``qwenvl.patch(model, fused_cross_entropy=True)``) equals the unfused loss.

Judged by the flash-attention rule (``qwenvl.tolerances.judge``): the unfused loss and gradients in float64
(CPU) / float32 (CUDA) are the reference, the unfused ones in the test dtype the yardstick. On CPU the option
computes the plain torch loss (the tests prove the wrapper: capture, label shift, reduction, router loss); on
CUDA it runs Liger-Kernel's fused kernel (the gpu-marked tests).
"""

from __future__ import annotations

import copy

import pytest
import torch

import qwenvl
from qwenvl.families import FAMILIES
from qwenvl.fixtures import FAMILY_NAMES, tiny_model
from qwenvl.packing import mask_boundary_labels
from qwenvl.patches._loss import liger_problem, shift_labels
from qwenvl.tolerances import judge, reference_dtype, tolerance
from qwenvl.verify.batches import SampleSpec, make_sample, pack

SPECS = (SampleSpec(9, image=(4, 4)), SampleSpec(23), SampleSpec(1), SampleSpec(12, image=(2, 6)))


def _batch(model, seed=0, *, boundaries_masked=True):
    gen = torch.Generator().manual_seed(seed)
    batch = pack(model, [make_sample(model.config, s, generator=gen) for s in SPECS])
    inputs = batch.model_inputs("upstream")
    labels = inputs["input_ids"].clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = -100  # prompt tokens
    if boundaries_masked:
        labels = mask_boundary_labels(labels, batch.cu_seqlens)
    return batch, inputs, labels


def _loss_and_grads(model, inputs, labels, *, fused, **extra):
    model.zero_grad(set_to_none=True)
    with qwenvl.patch(model, fused_cross_entropy=fused):
        out = model(**inputs, labels=labels, use_cache=False, **extra)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _cast(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _check(family, device, *, extra=None, config=None):
    if device.type == "cuda" and (why := liger_problem()):
        pytest.skip(f"the fused loss on CUDA is Liger-Kernel's: {why}")  # nox -s gpu installs the liger extra
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = tiny_model(family, **(config or {})).train()
    batch, inputs, labels = _batch(model)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    labels = labels.to(device)
    ref_model = copy.deepcopy(model).to(device, reference_dtype(device, dtype))
    if reference_dtype(device, dtype) == torch.float64 and hasattr(ref_model, "set_experts_implementation"):
        ref_model.set_experts_implementation("eager")
    model = model.to(device, dtype)
    ref, ref_grads = _loss_and_grads(ref_model, _cast(inputs, reference_dtype(device, dtype)), labels, fused=False, **(extra or {}))
    plain, plain_grads = _loss_and_grads(model, _cast(inputs, dtype), labels, fused=False, **(extra or {}))
    fused, fused_grads = _loss_and_grads(model, _cast(inputs, dtype), labels, fused=True, **(extra or {}))
    tol = tolerance(device, dtype)
    verdict = judge(fused.loss.detach(), ref.loss.detach(), plain.loss.detach(), k=tol.k_out)
    assert verdict.passed, f"loss: {verdict}"
    assert set(fused_grads) == set(ref_grads)
    for name, grad in fused_grads.items():
        verdict = judge(grad, ref_grads[name], plain_grads[name], k=tol.k_grad)
        assert verdict.passed, f"{name}: {verdict}"
    assert fused.logits is None
    return fused


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_loss_equals_the_unfused_loss(family, device):
    if device.type == "cpu" and (why := FAMILIES[family].release_bug("float64")):
        pytest.skip(f"no float64 reference: {why}")
    _check(family, device)


def test_fused_loss_with_num_items_in_batch(device):
    # What the Trainer passes under gradient accumulation: a sum divided by the tokens of the whole step.
    _check("qwen2_vl", device, extra={"num_items_in_batch": torch.tensor(37)})


def test_fused_loss_adds_the_router_loss(device):
    out = _check("qwen3_vl_moe", device, extra={"output_router_logits": True})
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0


def test_fused_loss_never_predicts_across_a_sample_boundary():
    # Labels straight from concatenated samples (no collator masking): the fused path still drops the pairs
    # (last token of a sample, first label of the next) and equals the loss of properly masked labels.
    model = tiny_model("qwen2_5_vl").train()
    batch, inputs, raw = _batch(model, boundaries_masked=False)
    masked = mask_boundary_labels(raw, batch.cu_seqlens)
    assert not torch.equal(raw, masked)
    with qwenvl.patch(model, fused_cross_entropy=True):
        from_raw = model(**inputs, labels=raw, use_cache=False).loss
        from_masked = model(**inputs, labels=masked, use_cache=False).loss
    torch.testing.assert_close(from_raw, from_masked, atol=0, rtol=0)


def test_shift_labels_masks_row_ends_and_sample_starts():
    from qwenvl.packing import VarlenMeta

    labels = torch.arange(10, 20).view(2, 5)
    meta = VarlenMeta.from_offsets([0, 3, 5, 7, 10])  # samples [0,3) [3,5) | [5,7) [7,10)
    shifted = shift_labels(labels, meta)
    assert shifted.tolist() == [[11, 12, -100, 14, -100], [16, -100, 18, 19, -100]]
    assert shift_labels(labels, None).tolist() == [[11, 12, 13, 14, -100], [16, 17, 18, 19, -100]]


def test_eval_and_unlabelled_calls_keep_their_logits():
    model = tiny_model("qwen3_vl")
    _, inputs, labels = _batch(model)
    with torch.no_grad(), qwenvl.patch(model, fused_cross_entropy=True):
        assert model.eval()(**inputs, labels=labels, use_cache=False).logits.shape[-1] == 512
        assert model.train()(**inputs, use_cache=False).logits.shape[-1] == 512


def test_fused_loss_is_reverted_and_needs_a_model():
    model = tiny_model("qwen2_vl")
    with qwenvl.patch(model, fused_cross_entropy=True):
        assert "forward" in model.__dict__
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    with pytest.raises(ValueError, match="fused_cross_entropy=True replaces a model's loss: pass the model"):
        qwenvl.patch(fused_cross_entropy=True)
