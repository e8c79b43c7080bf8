"""How a case runs and how it is judged, for ``qwenvl verify``'s cases (``qwenvl.verify.parity``) and the golden
check (``qwenvl.verify.golden``) alike: one home, so the two cannot drift.

    run_alone(model, rows, weights)          each sample of the rows alone, unpatched, an ordinary batch of one
                                             with the sample's own positions (those its packed row carries)
    run_packed(model, rows, weights, ...)    each packed row through the patched model, one forward each
    judge_runs(tol, out, ref, pt)            the rule (``qwenvl.tolerances.judge``) on the logits and on every
                                             gradient of ``out`` against the oracle ``ref`` and the yardstick ``pt``

Each run returns ``(logits (T, V), gradients by name)`` of the loss ``sum(logits * weights)``, linear in the logits,
so every logit and every gradient is checked (``loss_weights``: the weights of every case and of the golden files).
Pixels go in the model's dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from qwenvl.tolerances import Tolerance, judge
from qwenvl.verify.batches import PackedBatch

__all__ = ["run_alone", "run_packed", "gradients", "judge_runs", "Comparison", "loss_weights"]


def loss_weights(total: int, vocab: int) -> torch.Tensor:
    """float64 ``(T, V)``: ``W[t, v] = cos(0.7 t + 1.3 v) / T`` (a formula, so any framework can rebuild it)."""
    t = torch.arange(total, dtype=torch.float64)[:, None]
    v = torch.arange(vocab, dtype=torch.float64)[None, :]
    return torch.cos(0.7 * t + 1.3 * v) / total


def _weighted_backward(out: torch.Tensor, weights: torch.Tensor) -> None:
    (out * weights.to(device=out.device, dtype=out.dtype)).sum().backward()


def run_alone(model, rows: Sequence[PackedBatch], weights: torch.Tensor, *, names: Sequence[str] | None = None, device=None):
    """Each sample of ``rows`` alone through ``model`` (unpatched): logits ``(T, V)`` in row order and the gradients
    (``gradients``)."""
    from qwenvl.patches import active_patch

    if active_patch() is not None:
        raise RuntimeError("the samples alone run the unpatched model: revert the active qwenvl patch first")
    dtype = next(model.parameters()).dtype
    model.zero_grad(set_to_none=True)
    logits, start = [], 0
    for row in rows:
        for item in row.with_pixels(dtype).to(device).items:
            ids = item["input_ids"][None]
            inputs = {k: v for k, v in item.items() if k not in ("input_ids", "labels", "position_ids")}
            out = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=item["position_ids"][:, None, :], **inputs, use_cache=False
            ).logits[0]
            _weighted_backward(out, weights[start : start + out.shape[0]])
            logits.append(out.detach())
            start += out.shape[0]
    return torch.cat(logits), gradients(model, names)


def run_packed(
    model,
    rows: Sequence[PackedBatch],
    weights: torch.Tensor,
    *,
    convention: str = "upstream",
    index: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
    device=None,
    pad_to_multiple_of: int | None = None,
    **patch_options,
):
    """The packed ``rows`` through ``model`` patched with ``patch_options`` (``qwenvl.patch``), one forward each:
    logits ``(T, V)`` in the order of the samples (``index``: the sample-order position of each row token, rows
    concatenated; default: rows in order) and the gradients (``gradients``). ``pad_to_multiple_of``: each row
    padded with a filler segment (``PackedCollator``), whose logits are left out."""
    import qwenvl

    dtype = next(model.parameters()).dtype
    total = sum(row.input_ids.shape[1] for row in rows)
    index = torch.arange(total) if index is None else index
    model.zero_grad(set_to_none=True)
    logits, start = [], 0
    with qwenvl.patch(model, **patch_options):
        for row in rows:
            inputs = row.with_pixels(dtype).model_inputs(convention, device, pad_to_multiple_of=pad_to_multiple_of)
            out = model(**inputs).logits[0, : row.input_ids.shape[1]]  # a padded row's filler is no sample's
            end = start + out.shape[0]
            _weighted_backward(out, weights[index[start:end].to(weights.device)])
            logits.append(out.detach())
            start = end
    packed = torch.cat(logits)
    ordered = torch.empty_like(packed)
    ordered[index.to(packed.device)] = packed
    return ordered, gradients(model, names)


def _containers(model) -> re.Pattern:
    """The container prefixes releases rename, as one pattern: the entry class's ``base_model_prefix`` (4.57's
    Qwen3-Omni thinker: ``thinker``, the container its checkpoints hold it under), then transformers' ``model.`` and
    ``language_model.`` (4.57's thinker has ``model.layers.0...`` where 5.x has ``model.language_model.layers.0...``)."""
    base = getattr(model, "base_model_prefix", "")
    outer = "" if base in ("", "model", "language_model") else rf"({re.escape(base)}\.)?"
    return re.compile(rf"^{outer}(model\.)?(language_model\.)?")


def gradients(model, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter gradient of ``model`` by name (``names=None``), or those of ``names`` (the golden files'),
    found under this release's names where containers moved (a parameter without a gradient reads as zeros)."""
    params = dict(model.named_parameters())
    if names is None:
        return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    containers = _containers(model)
    by_canonical: dict[str, list[str]] = {}
    for name in params:
        by_canonical.setdefault(containers.sub("", name), []).append(name)
    out = {}
    for name in names:
        param = params.get(name)
        if param is None and len(by_canonical.get(containers.sub("", name), [])) == 1:
            param = params[by_canonical[containers.sub("", name)][0]]
        if param is not None:
            out[name] = torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
    return out


@dataclass
class Comparison:
    """The rule on one run against an oracle and a yardstick: the logits' error and bound, the worst gradient (the
    one furthest over, or least under, its bound; the first on a tie) with its error and bound, and why it failed."""

    logits_err: float
    logits_bound: float
    grad_err: float
    grad_bound: float
    worst_grad: str
    passed: bool
    why: str = ""

    @property
    def ratio(self) -> float:
        """The worst error over its bound (<= 1 passes)."""
        ratios = [e / b if b > 0 else (0.0 if e == 0 else float("inf")) for e, b in ((self.logits_err, self.logits_bound), (self.grad_err, self.grad_bound))]
        return max(ratios)


def judge_runs(tol: Tolerance, out: tuple, ref: tuple, pt: tuple | list[tuple]) -> Comparison:
    """The rule on the logits and every gradient of ``out`` against the oracle ``ref`` and the yardstick ``pt``
    (each ``(logits, gradients)``; ``pt`` may be a list of yardstick runs, the largest error counting), k from
    ``tol``; with ``tol.model_atol`` every absolute error must also stay under it. A shape that differs, or a
    gradient one side lacks, fails (named in ``why``)."""
    (logits, grads), (ref_logits, ref_grads) = out, ref
    runs = pt if isinstance(pt, list) else [pt]
    pt_logits = [run[0] for run in runs]
    if logits.shape != ref_logits.shape:
        return Comparison(float("inf"), 0.0, float("inf"), 0.0, "", False, f"logits shape {tuple(logits.shape)} != {tuple(ref_logits.shape)}")
    verdict = judge(logits, ref_logits, pt_logits, k=tol.k_out)
    passed, why, largest = verdict.passed, "" if verdict.passed else "logits", verdict.err
    grad_err, grad_bound, worst = 0.0, 0.0, ""
    if differ := sorted(set(grads) ^ set(ref_grads)):
        passed, why = False, f"gradient sets differ: {', '.join(differ[:3])}"
    for name, ref_grad in ref_grads.items():
        if name not in grads:
            continue
        if grads[name].shape != ref_grad.shape:
            passed, why = False, why or f"{name}: shape {tuple(grads[name].shape)} != {tuple(ref_grad.shape)}"
            continue
        g = judge(grads[name], ref_grad, [run[1][name] for run in runs], k=tol.k_grad)
        if not g.passed:
            passed, why = False, why or f"gradient of {name}"
        if not worst or g.err - g.bound > grad_err - grad_bound:
            grad_err, grad_bound, worst = g.err, g.bound, name
        largest = max(largest, g.err)
    if tol.model_atol is not None and largest >= tol.model_atol and passed:
        passed, why = False, f"absolute error {largest:.2e} >= model_atol {tol.model_atol:.0e}"
    return Comparison(verdict.err, verdict.bound, grad_err, grad_bound, worst, passed, why)
