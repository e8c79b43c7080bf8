"""Fused linear cross-entropy: the training loss from the final hidden states, without the logits.

With a 152k vocabulary the logits of an 8k-token packed row take 2.4 GB in bf16 (and as much again for their
gradient), more than most of the model's activations. ``qwenvl.patch(model, fused_cross_entropy=True)``
wraps that model's ``forward``: in training, with ``labels``, it runs the original forward with the
``lm_head`` call captured (it returns an empty tensor instead of logits) and computes the loss from the
captured hidden states and ``lm_head.weight``::

    hidden (B, L, D) --[lm_head: captured, returns (B, L, 0)]--> original forward (aux loss, outputs as usual)
    labels (B, L)  -> shift left by one; -100 at each row end and at each sample end of a packed row
    loss = CE(hidden @ W.T, shifted labels)     CUDA: Liger-Kernel's fused kernel, chunked, no logits kept
                                                CPU: the plain torch loss (same values; no memory saving)
    + router_aux_loss_coef * aux_loss           MoE families, when the forward returns an aux loss

The reduction is transformers' own: the mean over labelled tokens, or the sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation). The label shift never pairs a
sample's last token with the next sample's first label, whatever the collator did. ``outputs.logits`` is
``None`` on this path; evaluation (``model.eval()``) and calls without labels run the original forward.
"""

from __future__ import annotations

import functools
import importlib.metadata

import torch
import torch.nn.functional as F

from qwenvl.packing import IGNORE_INDEX, VarlenMeta

__all__ = ["install_fused_loss", "shift_labels", "linear_cross_entropy", "LIGER_MIN_VERSION"]

LIGER_MIN_VERSION = "0.6.0"


def liger_problem() -> str | None:
    """Why Liger-Kernel's fused loss cannot be used here, or ``None``."""
    from packaging.version import Version

    try:
        version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return "liger-kernel is not installed (pip install 'qwenvl[liger]')"
    if Version(version) < Version(LIGER_MIN_VERSION):
        return f"liger-kernel {version} is older than {LIGER_MIN_VERSION}"
    return None


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


def linear_cross_entropy(
    hidden_TD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_T: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    *,
    num_items_in_batch=None,
) -> torch.Tensor:
    """transformers' causal-LM loss of ``hidden @ weight.T (+ bias)`` against already shifted targets."""
    reduction = "mean" if num_items_in_batch is None else "sum"
    if hidden_TD.device.type == "cuda":
        problem = liger_problem()
        if problem is not None:
            raise RuntimeError(f"fused_cross_entropy on CUDA needs Liger-Kernel: {problem}")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        loss = liger_fused_linear_cross_entropy(
            hidden_TD, weight_VD, targets_T, bias_V, ignore_index=IGNORE_INDEX, reduction=reduction
        )
    else:
        logits = F.linear(hidden_TD, weight_VD, bias_V).float()
        loss = F.cross_entropy(logits, targets_T, ignore_index=IGNORE_INDEX, reduction=reduction)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


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
    device = head.weight.device
    if device.type == "cuda" and liger_problem() is not None:
        raise ValueError(f"fused_cross_entropy on CUDA needs Liger-Kernel: {liger_problem()}")
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
