"""The golden check's models: the family's embedded tiny model loaded on the installed release (``golden_model``), its
float64 copy (the oracle), and one intra-op thread while they run. The runs themselves are
``qwenvl.verify.runs``'s, as for every case.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from qwenvl.families import get_family

__all__ = ["golden_model", "float64_copy", "one_thread"]


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
