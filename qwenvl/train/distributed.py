"""Data-parallel training inside the launchers users already run (torchrun, ``accelerate launch``; DDP, FSDP2,
DeepSpeed through ``TrainingArguments`` or an accelerate config): what qwenvl adds to them.

**The vision dummy pass.** A rank whose batch holds no image (or no video) would leave the vision tower and
the projector out of its forward and backward while the other ranks run them. DDP (without
``find_unused_parameters``) then errors on the next step; FSDP2 and ZeRO-3 gather each block's parameters
with a collective when the block runs, so the ranks issue different collectives and hang. The dummy pass
runs the model's own ``get_image_features`` / ``get_video_features`` on a tiny zero input (one merged token:
``spatial_merge_size**2`` zero patches) and ties the result into the graph with a term that is exactly -0.0::

    rank 0, text + image:  embed -> get_image_features(pixels)         -> scatter into embeds -> decoder -> loss
    rank 1, text only:     embed -> get_image_features(4 zero patches) -> embeds + z          -> decoder -> loss
                           z = -(|sum of every float the tower returned| * 0)   (-0.0, in the graph)

``x + (-0.0) == x`` bitwise for every float ``x``, so the loss and every gradient of the real batch are
unchanged, bit for bit; the vision and projector parameters get a gradient of exactly zero from that rank
(``0 *`` a finite number). DDP then averages the other ranks' gradients with zeros, which is exactly what
DDP with ``find_unused_parameters=True`` does for a parameter one rank did not use (so, for a dense model,
that option's graph walk every step can be switched off). When no rank had a real image or video in an optimizer step, the
parameters the dummy touched get their gradient set to ``None`` before clipping and the optimizer step (one
scalar all-reduce decides it): the optimizer then skips them as it does on one process, and as DDP leaves a
parameter no rank used. (Not under DeepSpeed, which keeps its own gradient buffers: there they step with a
zero gradient, as DeepSpeed does with any unused parameter.)

Where it runs matters, in both directions. It runs inside the model's forward, in a forward pre-hook of the
language model: after the input embedding and the real vision passes, before the first decoder layer, the
place the real features join the embeddings. So FSDP2 has gathered the root's parameters (the patch embedding
and the merger live there; a vision call from outside the root forward fails with "mixed torch.Tensor and
DTensor"), each vision block's own FSDP2 or ZeRO-3 hooks gather it as in a real pass, and every rank issues
the same collectives in the same order: forward embedding, vision blocks, decoder layers; backward decoder
layers, vision blocks, embedding (autograd runs later-created nodes first, and the ``+ z`` node comes after
the embedding, as the real scatter does; adding ``z`` to the embedding's own output instead would make an
FSDP unit around the embedding gather before the vision blocks: a collective mismatch, seen on gloo). Every
forward runs one vision pass per modality the training set holds (real or dummy), so a rank with an image
and a video and a rank with only an image also run the same number of vision passes.

It is on whenever training runs under a launcher (``dummy_vision_pass_wanted``: DDP wraps the model even for a
single process, and with ``find_unused_parameters=False`` a text-only step would then fail) or with
``dummy_vision_pass=True``; ``dummy_vision_pass=False`` turns it off. It has no effect on a batch that has
inputs for every modality the data holds.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

__all__ = ["MODALITIES", "VisionDummy", "vision_modalities", "dummy_vision_pass_wanted"]

MODALITIES = ("image", "video")

# The forward input that carries each modality (5.24 also takes precomputed ``mm_encoder_outputs[modality]``).
_INPUTS = {"image": "pixel_values", "video": "pixel_values_videos"}


def dummy_vision_pass_wanted(args) -> bool:
    """``args.dummy_vision_pass`` if set; else whether the Trainer runs distributed (torchrun / accelerate launch,
    any number of processes: it then wraps the model in DDP, FSDP or DeepSpeed)."""
    from transformers.training_args import ParallelMode

    wanted = getattr(args, "dummy_vision_pass", None)
    if wanted is not None:
        return bool(wanted)
    return args.world_size > 1 or args.parallel_mode == ParallelMode.DISTRIBUTED


def vision_modalities(dataset) -> tuple[str, ...] | None:
    """Which of ``("image", "video")`` a training set holds, if it can tell (``None``: it cannot).

    Reads a ``modalities`` attribute, else the ``images`` / ``videos`` of ``SupervisedDataset``'s rows; looks
    through wrappers that keep the dataset in ``.dataset`` (``PackedDataset``).
    """
    candidate = dataset
    while candidate is not None:
        declared = getattr(candidate, "modalities", None)
        if declared is not None:
            unknown = set(declared) - set(MODALITIES)
            if unknown:
                raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {MODALITIES}")
            return tuple(m for m in MODALITIES if m in declared)
        rows = getattr(candidate, "rows", None)
        if isinstance(rows, list) and rows and all(hasattr(r, "images") and hasattr(r, "videos") for r in rows):
            has = {"image": any(r.images for r in rows), "video": any(r.videos for r in rows)}
            return tuple(m for m in MODALITIES if has[m])
        candidate = getattr(candidate, "dataset", None)
    return None


def _vl_model(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module that embeds the tokens, runs the vision tower and then the language model; that language
    model): the deepest module owning both ``visual`` and ``language_model`` (``XModel`` in every family that
    has one, PEFT wrappers included), else one owning ``visual`` and a text ``model`` (older Omni thinkers)."""
    owners = [m for m in model.modules() if isinstance(m._modules.get("visual"), torch.nn.Module)]
    for key in ("language_model", "model"):
        for module in reversed(owners):
            if isinstance(module._modules.get(key), torch.nn.Module) and hasattr(module, "get_image_features"):
                return module, module._modules[key]
    raise ValueError(f"{type(model).__name__} has no module owning a vision tower and a language model")


def _positional_names(forward) -> list[str]:
    return [
        p.name
        for p in inspect.signature(forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _float_total(obj) -> torch.Tensor | None:
    """The sum of every floating-point tensor in a (nested) model output, in float32; ``None`` if none."""
    if isinstance(obj, torch.Tensor):
        return obj.float().sum() if obj.is_floating_point() else None
    if isinstance(obj, dict):  # ModelOutput included
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    else:
        return None
    parts = [t for t in (_float_total(item) for item in items) if t is not None]
    return torch.stack(parts).sum() if parts else None


class VisionDummy:
    """Hooks on a Qwen-VL model that give every forward one vision pass per modality in ``modalities``
    (see the module docstring). ``remove()`` takes them off.

    Attributes (for tests and logs): ``dummy_passes`` counts the dummy passes run, per modality;
    ``real_forwards`` the training forwards with a real image or video since the last ``take_real_count()``.
    """

    def __init__(self, model, modalities: Sequence[str] = ("image",)) -> None:
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {MODALITIES}")
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.base, language_model = _vl_model(model)
        self._names = _positional_names(self.base.forward)
        self._lm_names = _positional_names(language_model.forward)
        self._pending: tuple[str, ...] = ()
        self.dummy_passes = {m: 0 for m in MODALITIES}
        self.real_forwards = 0
        self._handles = [
            self.base.register_forward_pre_hook(self._arm, with_kwargs=True),
            language_model.register_forward_pre_hook(self._run, with_kwargs=True),
            self.base.register_forward_hook(self._check),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take_real_count(self) -> int:
        """Training forwards with a real vision input since the last call (then reset to 0)."""
        count, self.real_forwards = self.real_forwards, 0
        return count

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters a dummy pass reaches: the whole vision tower, projector included."""
        visual = getattr(self.base, "visual", None)
        return [p for p in (visual.parameters() if visual is not None else ()) if p.requires_grad]

    # -- hooks -------------------------------------------------------------------------------------------

    def _arm(self, module, args, kwargs):
        inputs = {**dict(zip(self._names, args)), **kwargs}
        precomputed = inputs.get("mm_encoder_outputs") or {}
        present = {m for m in MODALITIES if inputs.get(_INPUTS[m]) is not None or precomputed.get(m) is not None}
        if present and module.training:
            self.real_forwards += 1
        self._pending = tuple(m for m in self.modalities if m not in present)
        return None

    def _run(self, module, args, kwargs):
        pending, self._pending = self._pending, ()
        if not pending:
            return None
        positional = "inputs_embeds" not in kwargs and "inputs_embeds" in self._lm_names[: len(args)]
        embeds = args[self._lm_names.index("inputs_embeds")] if positional else kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError(f"{type(module).__name__} got no inputs_embeds: the vision dummy pass cannot join in")
        total = None
        for modality in pending:
            part = _float_total(self._dummy_features(modality, embeds.device))
            if part is not None:
                total = part if total is None else total + part
            self.dummy_passes[modality] += 1
        if total is None:
            return None
        # -0.0 exactly (|t| * 0 is +0.0 for finite t): x + (-0.0) == x for every float x, sign of zero included.
        embeds = embeds + (-(total.abs() * 0.0)).to(embeds.dtype)
        if positional:
            args = list(args)
            args[self._lm_names.index("inputs_embeds")] = embeds
            return tuple(args), kwargs
        return args, {**kwargs, "inputs_embeds": embeds}

    def _check(self, module, args, output):
        if self._pending:
            pending, self._pending = self._pending, ()
            raise RuntimeError(
                f"the vision dummy pass for {', '.join(pending)} never ran: {type(module).__name__} did not call "
                "its language model"
            )
        return None

    def _dummy_features(self, modality: str, device: torch.device):
        vision = self.base.config.vision_config
        merge = int(vision.spatial_merge_size)
        patch_dim = int(vision.in_channels) * int(vision.temporal_patch_size) * int(vision.patch_size) ** 2
        visual = self.base.visual
        dtype = next(visual.parameters()).dtype
        pixels = torch.zeros(merge * merge, patch_dim, dtype=dtype, device=device)
        grid = torch.tensor([[1, merge, merge]], dtype=torch.long, device=device)
        if modality == "image":
            return self.base.get_image_features(pixels, grid)
        return self.base.get_video_features(pixels, grid)
