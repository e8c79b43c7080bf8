"""The golden runs: the family's embedded tiny model loaded on the installed release (``golden_model``), and the
two ways the golden check runs it, each with the loss of the golden files (``golden_files.loss_weights``):
each sample alone through the unpatched model (``run_unpatched``: the oracle in float64, the yardstick in float32)
and the packed rows through the patched model (``run_patched``). Gradients are read under the golden files'
parameter names, also where a release renamed the containers (``_grads``).
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Sequence

import torch

from qwenvl.families import get_family
from qwenvl.verify.batches import PackedBatch
from qwenvl.verify.golden_files import loss_weights

__all__ = ["golden_model", "float64_copy", "run_unpatched", "run_patched", "one_thread"]


def _transpose_fused_experts(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 5.x checkpoint for a release that keeps fused MoE experts transposed (4.x: gate_up (E, H, 2I), down
    (E, I, H); 5.x: (E, 2I, H), (E, H, I)). The layout is read from ``down_proj``, which is never square in the
    fixtures; ``gate_up_proj`` may be (2I == H) and follows it."""
    own = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if not key.endswith("experts.down_proj"):
            continue
        if own[key].shape == value.shape:
            continue
        if own[key].shape != value.transpose(-1, -2).shape:
            raise ValueError(f"{key}: checkpoint {tuple(value.shape)} fits neither layout of {tuple(own[key].shape)}")
        prefix = key[: -len("down_proj")]
        for name in ("down_proj", "gate_up_proj"):
            out[prefix + name] = state[prefix + name].transpose(-1, -2).contiguous()
    return out


def golden_model(family: str):
    """The family's embedded tiny model, float32, eval mode, sdpa attention, loaded on the installed release.

    ``from_pretrained`` reads the checkpoint (each release maps its own key names). A release that cannot
    (transformers 4.x refuses Qwen3-VL-MoE's fused experts, written by 5.x transposed) gets the tensors loaded
    directly, the experts transposed into its layout.
    """
    import transformers

    from qwenvl.fixtures import model_dir

    spec = get_family(family)
    folder = model_dir(family)  # FileNotFoundError naming scripts/make_fixtures.py when it is missing
    cls = spec.entry_type()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(folder, attn_implementation="sdpa")
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        from safetensors.torch import load_file

        from qwenvl.fixtures import tiny_model

        model = tiny_model(family)
        state = load_file(folder / "model.safetensors")
        model.load_state_dict(_transpose_fused_experts(model, state), strict=True)
    return model.to(torch.float32).eval()


def _cast(value, dtype):
    return None if value is None else value.to(dtype)


def run_unpatched(model, batch: PackedBatch, names: Sequence[str]):
    """Each sample alone through ``model`` (unpatched), with the batch's positions: logits ``(T, V)`` and the
    gradients of ``loss`` for ``names``."""
    from qwenvl.patches import active_patch

    if active_patch() is not None:
        raise RuntimeError("the golden oracle runs the unpatched model: revert the active qwenvl patch first")
    dtype = next(model.parameters()).dtype
    total = batch.input_ids.shape[1]
    weights = loss_weights(total, model.config.text_config.vocab_size)
    model.zero_grad(set_to_none=True)
    logits, cu = [], batch.cu_seqlens.tolist()
    for sample, start, end in zip(batch.samples, cu[:-1], cu[1:]):
        ids = sample.input_ids[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": batch.position_ids[:, :, start:end]}
        for key in ("pixel_values", "pixel_values_videos"):
            value = getattr(sample, key)
            if value is not None:
                inputs[key] = value.to(dtype)
        for key in ("image_grid_thw", "video_grid_thw"):
            value = getattr(sample, key)
            if value is not None:
                inputs[key] = value
        out = model(**inputs, use_cache=False).logits[0]
        (out * weights[start:end].to(out.dtype)).sum().backward()
        logits.append(out.detach())
    return torch.cat(logits), _grads(model, names)


def run_patched(
    model, rows: Sequence[PackedBatch], names: Sequence[str], *, index: torch.Tensor | None = None, backend: str = "sdpa"
):
    """The packed rows through the patched ``model`` (upstream convention), one forward each: logits ``(T, V)``
    in the batch's token order (``index``: the batch position of each row token, rows concatenated; default
    the identity) and the gradients of the loss over all of them."""
    import qwenvl

    dtype = next(model.parameters()).dtype
    total = sum(row.input_ids.shape[1] for row in rows)
    index = torch.arange(total) if index is None else index
    weights = loss_weights(total, model.config.text_config.vocab_size)[index]
    model.zero_grad(set_to_none=True)
    logits, start = [], 0
    with qwenvl.patch(model, backend=backend):
        for row in rows:
            moved = copy.copy(row)
            moved.pixel_values = _cast(row.pixel_values, dtype)
            moved.pixel_values_videos = _cast(row.pixel_values_videos, dtype)
            out = model(**moved.model_inputs("upstream")).logits[0]
            end = start + out.shape[0]
            (out * weights[start:end].to(out.dtype)).sum().backward()
            logits.append(out.detach())
            start = end
    ordered = torch.empty_like(torch.cat(logits))
    ordered[index] = torch.cat(logits)
    return ordered, _grads(model, names)


def _containers(model) -> re.Pattern:
    """The container prefixes releases rename, as one pattern: the entry class's ``base_model_prefix`` (4.57's
    Qwen3-Omni thinker: ``thinker``, the container its checkpoints hold it under), then transformers' ``model.`` and
    ``language_model.`` (4.57's thinker has ``model.layers.0...`` where 5.x has ``model.language_model.layers.0...``)."""
    base = getattr(model, "base_model_prefix", "")
    outer = "" if base in ("", "model", "language_model") else rf"({re.escape(base)}\.)?"
    return re.compile(rf"^{outer}(model\.)?(language_model\.)?")


def _canonical(name: str, containers: re.Pattern) -> str:
    """A parameter name without the container prefixes releases rename (``_containers``)."""
    return containers.sub("", name)


def _grads(model, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The gradients of ``names`` (the golden names), found under this release's names where containers moved."""
    params = dict(model.named_parameters())
    containers = _containers(model)
    by_canonical: dict[str, list[str]] = {}
    for name in params:
        by_canonical.setdefault(_canonical(name, containers), []).append(name)
    out = {}
    for name in names:
        param = params.get(name)
        if param is None and len(by_canonical.get(_canonical(name, containers), [])) == 1:
            param = params[by_canonical[_canonical(name, containers)][0]]
        if param is not None:
            out[name] = torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
    return out


def float64_copy(model):
    """``model`` in float64 (transformers 5.x runs MoE experts through grouped_mm, which has no float64 kernel)."""
    ref = copy.deepcopy(model).to(torch.float64)
    if hasattr(ref, "set_experts_implementation"):
        ref.set_experts_implementation("eager")
    return ref


@contextlib.contextmanager
def one_thread():
    """Run on one intra-op thread (restored after): the tiny models gain nothing from more, and on a busy machine
    spinning threads made a family's check 30x slower (measured: 0.9 s against 29 s on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
