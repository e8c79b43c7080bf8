"""Fused linear cross-entropy: the training loss from the final hidden states, without the logits.

With a 152k vocabulary the logits of an 8k-token packed row take 2.4 GB in bf16 (and as much again for their
gradient), more than most of the model's activations. ``qwenvl.patch(model, fused_cross_entropy=True)``
wraps that model's ``forward``: in training, with ``labels``, it runs the original forward with the
``lm_head`` call captured (it returns an empty tensor instead of logits) and computes the loss from the
captured hidden states and ``lm_head.weight``::

    hidden (B, L, D) --[lm_head: captured, returns (B, L, 0)]--> original forward (aux loss, outputs as usual)
    labels (B, L)  -> shift left by one; -100 at each row end and at each sample end of a packed row
    loss = CE(hidden @ W.T, shifted labels)     chunk by chunk of tokens, the gradients made in the forward
                                                (``_ChunkedLinearCrossEntropy``): one chunk's logits at a time
    + router_aux_loss_coef * aux_loss           MoE families, when the forward returns an aux loss

The same code runs on every device, so the CPU tests test what trains on the GPU. It reads nothing back from the
device (Liger-Kernel's fused loss, used here before, synced three times a step: a ``.item()`` of the labelled
count and a test of the incoming gradient; H100, Liger 0.8.5).

The reduction is transformers' own: the mean over labelled tokens, or the sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation). The label shift never pairs a
sample's last token with the next sample's first label, whatever the collator did. ``outputs.logits`` is
``None`` on this path; evaluation (``model.eval()``) and calls without labels run the original forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from qwenvl.packing import IGNORE_INDEX, VarlenMeta

__all__ = ["install_fused_loss", "shift_labels", "linear_cross_entropy", "CHUNK_ELEMENTS"]

# Logits held at once: this many (fp32) per chunk of tokens, 512 MiB (880 tokens of a 152k vocabulary).
CHUNK_ELEMENTS = 2**27
# The weight's gradient is summed this many vocabulary rows at a time (a 16k x hidden temporary, not vocab x hidden).
WEIGHT_ROWS = 16384


def shift_labels(labels_BL: torch.Tensor, meta: VarlenMeta | None) -> torch.Tensor:
    """``labels[t + 1]`` at ``t``; ``IGNORE_INDEX`` at each row end and before every sample start."""
    B, L = labels_BL.shape
    shifted = F.pad(labels_BL, (0, 1), value=IGNORE_INDEX)[:, 1:]
    if meta is not None:
        starts = [o for o in meta.offsets[1:-1]]  # flattened positions where a sample starts inside the batch
        if starts:
            # The positions before each start, as a mask built on the host and uploaded without a sync (an
            # index_put on the GPU synced: H100, torch 2.11); torch.where then needs no host either.
            before = torch.zeros(B * L, dtype=torch.bool)
            before[torch.tensor(starts, dtype=torch.long) - 1] = True
            if shifted.is_cuda:
                before = before.pin_memory().to(shifted.device, non_blocking=True)
            shifted = torch.where(before.to(shifted.device).view(B, L), IGNORE_INDEX, shifted)
    return shifted


def _inverse(divisor):
    """``1 / divisor``, 0 where the divisor is 0 (no labelled token: torch's loss is NaN, its gradients 0)."""
    if isinstance(divisor, torch.Tensor):
        return torch.where(divisor == 0, 0.0, 1.0 / divisor)
    return 0.0 if divisor == 0 else 1.0 / divisor


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum(CE(hidden @ W.T + b, targets)) / divisor`` a chunk of tokens at a time, its gradients made in the forward.

    Per chunk: the logits as transformers makes them (a matmul in the inputs' dtype, then fp32), their
    log-sum-exp, the loss of the labelled tokens, and in the same buffer the gradient ``softmax - onehot`` (zero on
    ignored tokens), cast to the inputs' dtype for the matmuls that give the chunk's input gradient and its share
    of the weight's (summed in fp32, ``WEIGHT_ROWS`` vocabulary rows at a time, so no vocabulary x hidden
    temporary). Only one chunk's logits exist at a time.

    In float16 the gradients are kept unscaled, of order 1, and ``1 / divisor`` times the incoming gradient is
    applied in fp32 in the backward: an fp16 loss scale (the GradScaler's) reaches them before they are rounded to
    the input dtype, as it would through the unfused loss (``softmax - onehot`` over thousands of tokens is below
    fp16's normal range). In bfloat16 and float32, whose range is fp32's, ``softmax - onehot`` is divided in fp32
    before that rounding, as the unfused loss divides it; only the incoming gradient waits for the backward.

    Nothing reads a value back: the chunks come from the shape, ``divisor`` is a number or a device tensor, and the
    backward multiplies by its incoming gradient (no test whether that is 1.0). ``want_grads``:
    ``torch.is_grad_enabled()`` at the call (under ``no_grad`` no gradient is made).
    """

    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, bias_V, targets_T, divisor, want_grads):
        T, V = hidden_TD.shape[0], weight_VD.shape[0]
        need_input, need_weight, need_bias = (want_grads and need for need in ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden_TD) if need_input else None
        grad_weight = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_weight else None
        grad_bias = torch.zeros(V, dtype=torch.float32, device=weight_VD.device) if need_bias else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden_TD.device)
        inverse = _inverse(divisor)
        divide_first = hidden_TD.dtype != torch.float16  # the class docstring: fp16 keeps its gradients unscaled
        step = max(1, CHUNK_ELEMENTS // max(V, 1))
        for start in range(0, T, step):
            x_CD, y_C = hidden_TD[start : start + step], targets_T[start : start + step]
            logits_CV = F.linear(x_CD, weight_VD, bias_V).float()
            labelled_C = y_C != IGNORE_INDEX
            y_C = torch.where(labelled_C, y_C, 0)
            picked_C = logits_CV.gather(1, y_C[:, None]).squeeze(1)
            # log-sum-exp in the logits' own buffer (no second chunk-sized buffer): exp(logits - max), its sum
            max_C1 = logits_CV.amax(dim=-1, keepdim=True)
            exp_CV = logits_CV.sub_(max_C1).exp_()
            sum_C = exp_CV.sum(dim=-1)
            lse_C = max_C1.squeeze(1) + sum_C.log()
            loss = loss + torch.where(labelled_C, lse_C - picked_C, 0.0).sum()
            if not (need_input or need_weight or need_bias):
                continue
            # softmax - onehot on labelled rows, 0 on the others: one pass over the chunk, then the targets
            keep_C = labelled_C.to(exp_CV.dtype)
            if divide_first:
                keep_C = keep_C * inverse
            grad_CV = exp_CV.mul_((keep_C / sum_C)[:, None])
            grad_CV.scatter_add_(1, y_C[:, None], -keep_C[:, None])
            if need_bias:
                grad_bias += grad_CV.sum(0)
            grad_CV = grad_CV.to(hidden_TD.dtype)
            if need_input:
                torch.mm(grad_CV, weight_VD, out=grad_hidden[start : start + step])
            if need_weight:
                for row in range(0, V, WEIGHT_ROWS):
                    grad_weight[row : row + WEIGHT_ROWS] += grad_CV[:, row : row + WEIGHT_ROWS].t() @ x_CD
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight_VD.dtype, None if bias_V is None else bias_V.dtype)
        ctx.inverse = 1.0 if divide_first else inverse
        return loss / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # The weight's fp32 sum is scaled in place (no second fp32 copy at the backward's memory peak), so a
        # second backward through the same loss would scale it twice: refused.
        if getattr(ctx, "used", False):
            raise RuntimeError("fused_cross_entropy's loss cannot be backpropagated twice (retain_graph)")
        ctx.used = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        # in fp32: a 0-dim CUDA tensor times a half-precision one would be rounded to that dtype first
        factor = grad_loss.float() * ctx.inverse
        return (
            None if grad_hidden is None else (grad_hidden.float() * factor).to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight.mul_(factor).to(weight_dtype),
            None if grad_bias is None else grad_bias.mul_(factor).to(bias_dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_T: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    *,
    num_items_in_batch=None,
) -> torch.Tensor:
    """transformers' causal-LM loss of ``hidden @ weight.T (+ bias)`` against already shifted targets: the mean over
    labelled tokens, or the sum divided by ``num_items_in_batch``; the logits never whole, no host sync."""
    if num_items_in_batch is None:
        divisor = (targets_T != IGNORE_INDEX).sum().float()  # a device tensor: no sync
    elif isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.device.type != "cpu":
        divisor = num_items_in_batch.to(hidden_TD.device, torch.float32)
    else:  # a number, or a CPU tensor: read on the host, no upload to wait for
        divisor = float(num_items_in_batch)
    from qwenvl.patches._dispatch import autocast_dtype

    dtype = autocast_dtype(hidden_TD, weight_VD)
    if dtype is not None:
        # The unfused head under autocast is a linear in the autocast dtype: its inputs cast (autograd records the
        # casts, so the gradients come back in the parameters' dtype), then the loss as for a half-precision
        # model. Inside, autocast off: left on, it rounded the logits' matmul but not the gradients' (``out=``).
        hidden_TD, weight_VD = hidden_TD.to(dtype), weight_VD.to(dtype)
        bias_V = None if bias_V is None else bias_V.to(dtype)
        with torch.autocast(hidden_TD.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy.apply(hidden_TD, weight_VD, bias_V, targets_T, divisor, torch.is_grad_enabled())
    return _ChunkedLinearCrossEntropy.apply(hidden_TD, weight_VD, bias_V, targets_T, divisor, torch.is_grad_enabled())


def _output_head(model) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"fused_cross_entropy needs lm_head to be a plain torch.nn.Linear, got {type(head).__name__} "
            "(a LoRA adapter or modules_to_save on lm_head?): patch without fused_cross_entropy"
        )
    return head


def install_fused_loss(model, recorder, *, aux_coef_key: str | None) -> None:
    """Wrap ``model.forward`` (the instance's, recorded for undo) with the fused loss."""
    from qwenvl.patches._dispatch import packed_meta_from_inputs
    from qwenvl.families import base_model

    target = base_model(model)
    head = _output_head(target)
    if "forward" in target.__dict__:
        raise ValueError(f"{type(target).__name__} already has its own forward (fused loss installed twice?)")
    original = target.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        labels = kwargs.get("labels")
        if args or labels is None or not target.training:
            return original(*args, **kwargs)
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels")
        num_items = kwargs.pop("num_items_in_batch", None)
        from qwenvl.patches import active_patch

        applied = active_patch()
        meta = packed_meta_from_inputs(kwargs, None if applied is None else applied.state)
        captured = []

        def capture(hidden):
            captured.append(hidden)
            return hidden.new_empty(*hidden.shape[:-1], 0)

        head.forward = capture
        try:
            outputs = original(**kwargs)
        finally:
            del head.__dict__["forward"]
        (hidden_BLD,) = captured
        if hidden_BLD.shape[:2] != labels.shape:
            raise ValueError(
                f"fused_cross_entropy needs hidden states for every labelled token: got {tuple(hidden_BLD.shape[:2])} "
                f"for labels {tuple(labels.shape)} (logits_to_keep?)"
            )
        targets = shift_labels(labels.to(hidden_BLD.device), meta)
        loss = linear_cross_entropy(
            hidden_BLD.reshape(-1, hidden_BLD.shape[-1]), head.weight, targets.reshape(-1), head.bias,
            num_items_in_batch=num_items,
        )
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None and aux_coef_key is not None:
            text_config = getattr(target.config, "text_config", target.config)
            loss = loss + getattr(text_config, aux_coef_key) * aux.to(loss.device)
        outputs["loss"] = loss
        outputs.logits = None  # the key keeps the empty (B, L, 0) tensor: ModelOutput cannot drop a key
        return outputs

    target.forward = forward
    recorder.add_undo(functools.partial(target.__dict__.pop, "forward"))
