"""Fused linear cross-entropy (``qwenvl.patch(model, fused_cross_entropy=True)``) equals the unfused loss.

Judged by the flash-attention rule (``qwenvl.tolerances.judge``): the unfused loss and gradients in float64
(CPU) / float32 (CUDA) are the reference, the unfused ones in the test dtype the yardstick. The chunked loss is
the same code on every device: the CPU tests prove it and the wrapper (capture, label shift, reduction, router
loss), the gpu-marked ones its bf16 arithmetic.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qwenvl
from qwenvl.families import FAMILIES
from qwenvl.fixtures import FAMILY_NAMES, tiny_model
from qwenvl.packing import mask_boundary_labels
from qwenvl.patches._loss import shift_labels
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


def _reference_loss(out, labels, num_items_in_batch=None, aux_coef=None):
    """transformers' causal-LM loss (+ the router loss) in the logits' own dtype: its loss upcasts the logits to
    float32 only, so a float64 reference model's own loss would be no more precise than the yardstick's."""
    logits = out.logits.flatten(0, 1)
    targets = shift_labels(labels, None).flatten().to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch.to(loss.device)
    if aux_coef is not None and getattr(out, "aux_loss", None) is not None:
        loss = loss + aux_coef * out.aux_loss.to(loss.dtype)
    return loss


def _loss_and_grads(model, inputs, labels, *, fused, reference=False, **extra):
    model.zero_grad(set_to_none=True)
    with qwenvl.patch(model, fused_cross_entropy=fused):
        out = model(**inputs, labels=labels, use_cache=False, **extra)
        if reference:
            text_config = getattr(model.config, "text_config", model.config)
            aux_coef = getattr(text_config, "router_aux_loss_coef", None) if extra.get("output_router_logits") else None
            out["loss"] = _reference_loss(out, labels, extra.get("num_items_in_batch"), aux_coef)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _cast(inputs, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def _check(family, device, *, extra=None, config=None):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = tiny_model(family, **(config or {})).train()
    batch, inputs, labels = _batch(model)
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    labels = labels.to(device)
    ref_model = copy.deepcopy(model).to(device, reference_dtype(device, dtype))
    if reference_dtype(device, dtype) == torch.float64 and hasattr(ref_model, "set_experts_implementation"):
        ref_model.set_experts_implementation("eager")
    model = model.to(device, dtype)
    ref, ref_grads = _loss_and_grads(ref_model, _cast(inputs, reference_dtype(device, dtype)), labels, fused=False,
                                     reference=True, **(extra or {}))
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


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("frozen", ["none", "weight", "hidden"])
@pytest.mark.parametrize("num_items", [None, 7, "host_tensor", "device_tensor"])
def test_the_chunked_loss_equals_the_unfused_loss_over_many_chunks(device, monkeypatch, bias, frozen, num_items):
    """``linear_cross_entropy`` a few tokens and vocabulary rows at a time (the last chunk and block shorter)
    against the whole-logits loss, backpropagated with a loss scale as fp16 training does: the loss and each
    input's gradient, by the rule, in every half dtype on CUDA (bf16 on the CPU too: it divides its gradients in the
    forward, fp16 in the backward); a frozen input gets no gradient."""
    import qwenvl.patches._loss as loss_module

    V, D, T = 37, 16, 29
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 4 * V)  # 4 tokens a chunk: 8 chunks, the last of 1
    monkeypatch.setattr(loss_module, "WEIGHT_ROWS", 10)  # the weight's gradient in 4 blocks, the last of 7 rows
    gen = torch.Generator().manual_seed(11)
    leaves = {"hidden": torch.randn(T, D, generator=gen), "weight": torch.randn(V, D, generator=gen) / D**0.5}
    if bias:
        leaves["bias"] = torch.randn(V, generator=gen)
    targets = torch.randint(0, V, (T,), generator=gen)
    targets[torch.rand(T, generator=gen) < 0.3] = -100
    items = {"host_tensor": torch.tensor(7), "device_tensor": torch.tensor(7, device=device)}.get(num_items, num_items)
    loss_scale = 1024.0  # what a GradScaler multiplies the loss by

    def run(fn, dtype):
        inputs = {k: v.to(device, dtype, copy=True).requires_grad_(k != frozen) for k, v in leaves.items()}
        out = fn(inputs, targets.to(device))
        (out * loss_scale).backward()
        return out.detach(), {k: v.grad for k, v in inputs.items()}

    def unfused(inputs, targets):
        logits = torch.nn.functional.linear(inputs["hidden"], inputs["weight"], inputs.get("bias")).float()
        reduction = "mean" if items is None else "sum"
        out = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
        return out if items is None else out / items

    def chunked(inputs, targets):
        return loss_module.linear_cross_entropy(inputs["hidden"], inputs["weight"], targets, inputs.get("bias"),
                                                num_items_in_batch=items)

    for dtype in [torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.bfloat16, torch.float16]:
        ref, ref_grads = run(unfused, reference_dtype(device, dtype))
        plain, plain_grads = run(unfused, dtype)
        out, grads = run(chunked, dtype)
        tol = tolerance(device, dtype)
        assert (verdict := judge(out, ref, plain, k=tol.k_out)).passed, f"{dtype} loss: {verdict}"
        for name, grad in grads.items():
            if name == frozen:
                assert grad is None
                continue
            verdict = judge(grad, ref_grads[name], plain_grads[name], k=tol.k_grad)
            assert verdict.passed, f"{dtype} {name}: {verdict}"


def test_the_chunked_loss_of_no_labelled_token_is_nan_and_its_gradients_zero_as_torchs():
    import qwenvl.patches._loss as loss_module

    leaves = [torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)]
    targets = torch.full((3,), -100)
    expected = torch.nn.functional.cross_entropy(leaves[0] @ leaves[1].T, targets, ignore_index=-100)
    expected.backward()
    expected_grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    loss = loss_module.linear_cross_entropy(*leaves, targets)
    loss.backward()
    assert expected.isnan() and loss.isnan()
    for leaf, grad in zip(leaves, expected_grads):
        assert not grad.any() and torch.equal(leaf.grad, grad)


def test_the_chunked_loss_makes_no_gradient_under_no_grad(monkeypatch):
    import qwenvl.patches._loss as loss_module

    products = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args, **kwargs: products.append(1) or real_mm(*args, **kwargs))
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 4, 0, 3])
    with torch.no_grad():
        quiet = loss_module.linear_cross_entropy(hidden, weight, targets)
    assert products == [] and quiet.grad_fn is None
    loud = loss_module.linear_cross_entropy(hidden, weight, targets)
    assert products and torch.equal(quiet, loud.detach())
