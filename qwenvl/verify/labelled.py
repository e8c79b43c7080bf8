"""A case that trains on labels (``qwenvl verify --fused_cross_entropy``): the fused loss (``qwenvl.patches._loss``)
runs only in training, with labels, and keeps no logits, so such a case judges the loss in the logits' place, and
every gradient (``qwenvl.verify.runs.judge_runs`` on ``(loss (1,), gradients)``)::

    alone_loss    each sample of a packed row alone, unpatched, their logits side by side (T, V):
                  sum over t of CE(logits[t], targets[t]), per row, divided by N
    packed_loss   each packed row, patched (the fused loss when asked), in training:
                  model(**row, labels=row's labels, num_items_in_batch=N).loss
    targets       the row's labels shifted left by one: IGNORE_INDEX at each sample's last token
    N             the targets of all rows together

The labels are the collator's (``PackedBatch.labels``) from the items' own (``qwenvl.data.synthetic``: the
ids, so every next token of a sample is a target; each sample's first label is masked in a row). Both sides sum the
same terms in the same order, one sum per row, the oracle in its own dtype (float64 on the CPU) and the yardstick in
float32, as the fused loss on the CPU and transformers' loss do: a scalar is judged, so its rounding must be alike.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from qwenvl.packing import IGNORE_INDEX
from qwenvl.verify.batches import PackedBatch, Sample, sample_inputs
from qwenvl.verify.runs import gradients

__all__ = ["alone_loss", "packed_loss", "targets"]


def targets(rows: Sequence[PackedBatch], convention: str = "upstream") -> int:
    """N: the labelled targets of ``rows`` (a label is a target of the token before it, in its own sample)."""
    return sum(int((row.labels[0, 1:] != IGNORE_INDEX).sum()) for row in rows)


def alone_loss(
    model, rows: Sequence[PackedBatch], *, convention: str = "upstream", device=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each sample of ``rows`` alone through ``model`` (unpatched): the loss ``(1,)`` and the gradients."""
    from qwenvl.patches import active_patch

    if active_patch() is not None:
        raise RuntimeError("the samples alone run the unpatched model: revert the active qwenvl patch first")
    count = targets(rows, convention)
    dtype = next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    losses = []
    for row in rows:
        row = row.with_pixels(dtype)
        alone = [sample_inputs(model, Sample.of_item(item), device) for item in row.items]
        logits = torch.cat([model(**inputs, use_cache=False).logits[0] for inputs in alone])
        shifted = F.pad(row.labels[0, 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
        upcast = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = F.cross_entropy(upcast, shifted, ignore_index=IGNORE_INDEX, reduction="sum") / count
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum().reshape(1), gradients(model)


def packed_loss(
    model, rows: Sequence[PackedBatch], *, convention: str = "upstream", device=None, **patch_options
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each packed row of ``rows`` through ``model`` patched with ``patch_options`` (``qwenvl.patch``), in training
    mode (restored after), its loss divided by N: the loss ``(1,)`` over all rows and the gradients."""
    import qwenvl

    count = targets(rows, convention)
    dtype = next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    losses = []
    training = model.training
    model.train()
    try:
        with qwenvl.patch(model, **patch_options):
            for row in rows:
                inputs = row.with_pixels(dtype).model_inputs(convention, device)
                loss = model(**inputs, labels=row.labels.to(device), num_items_in_batch=count).loss
                loss.backward()
                losses.append(loss.detach())
    finally:
        model.train(training)
    return torch.stack(losses).sum().reshape(1), gradients(model)
