"""Explicit, reversible, verified patches that make Qwen-VL models train on packed batches.

    handle = qwenvl.patch()                    # every supported family
    handle = qwenvl.patch(model)               # that model's family; its vision tower onto the varlen core
    with qwenvl.patch(backend="torch"): ...    # context-manager form
    qwenvl.patch(model, options=PatchOptions(compile=True))   # the options as one object (qwenvl.options)
    handle.revert()                            # originals back exactly (``Cls.forward is original``)

What gets touched, per family (see ``qwenvl.families``), all recorded for revert:
  - ``forward`` of the entry classes (``XForConditionalGeneration``, ``XModel``): packed conventions -> one
    ``VarlenMeta`` passed on as the attention mask;
  - the modeling module's mask builders: a ``VarlenMeta`` passes through unchanged;
  - the modeling module's ``ALL_ATTENTION_FUNCTIONS`` / ``eager_attention_forward`` globals: every attention
    function they hand out first checks for a ``VarlenMeta`` (text) or ``cu_seq_lens_q`` (vision flash path);
  - the MoE router loss: a ``VarlenMeta`` mask counts every token;
  - transformers' ``AttentionInterface``: the name ``qwenvl_flash_varlen``, through ``register`` (the vision
    tower's implementation when a model is given, so it takes its single-call varlen path); undone by
    restoring the previous entry, or removing the key when there was none.
transformers offers no extension point for the entry detection and the mask pass-through, hence module
attributes. Everything is checked before anything is changed: a patch that cannot be applied raises and
leaves nothing behind.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Iterable

from qwenvl.families import FAMILIES, FamilySpec, UnknownFamilyError, family_of_model, get_family
from qwenvl.options import PatchOptions
from qwenvl.patches import _dispatch, _linear, _visual
from qwenvl.patches._handle import MISSING, PatchRecorder
from qwenvl.patches._versions import check_transformers_version

__all__ = [
    "patch",
    "PatchOptions",
    "PatchHandle",
    "PatchError",
    "UnknownFamilyError",
    "active_patch",
    "VARLEN_IMPLEMENTATION",
]

logger = logging.getLogger(__name__)

VARLEN_IMPLEMENTATION = "qwenvl_flash_varlen"

_ACTIVE: "_AppliedPatch | None" = None


class PatchError(RuntimeError):
    """A patch target is missing or has a signature we do not know: nothing was changed."""


class _AppliedPatch:
    """The patch itself, shared by every handle that asked for it; undone when the last handle lets go."""

    def __init__(self, state: _dispatch.PatchState, recorder: PatchRecorder, families: tuple[str, ...]):
        self.state = state
        self.recorder = recorder
        self.families = families
        self.handles = 0


class PatchHandle:
    """One claim on the applied patch. ``revert()`` (or leaving the ``with`` block) drops it, undoing what this
    call added (a model's vision routing); the patch itself is undone, exactly, when the last handle goes.

    Handles nest: ``with qwenvl.patch(model):`` inside an earlier ``qwenvl.patch()`` leaves the outer patch in
    place on exit.
    """

    def __init__(self, applied: _AppliedPatch, own: PatchRecorder):
        self._applied = applied
        self._own = own
        self._released = False
        applied.handles += 1

    @property
    def backend(self) -> str:
        return self._applied.state.backend

    @property
    def families(self) -> tuple[str, ...]:
        return self._applied.families

    @property
    def active(self) -> bool:
        return not self._released and _ACTIVE is self._applied

    def revert(self) -> None:
        global _ACTIVE
        if self._released:
            return
        self._released = True
        self._own.undo()
        self._applied.handles -= 1
        if self._applied.handles == 0:
            self._applied.recorder.undo()
            if _ACTIVE is self._applied:
                _ACTIVE = None

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"PatchHandle(families={self.families}, backend={self.backend!r}, {state})"


def active_patch() -> "_AppliedPatch | None":
    """The applied patch (families, backend state), or ``None`` when nothing is patched."""
    return _ACTIVE


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        # Installed without sources (bytecode only): this one check cannot be made; the parity harness
        # (`qwenvl verify`) still proves the dispatch end to end.
        return "ALL_ATTENTION_FUNCTIONS"


def _check_family(spec: FamilySpec) -> list[str]:
    """Problems that would stop ``spec`` from being patched on the installed transformers (empty: fine)."""
    try:
        module = spec.import_module()
    except ImportError as exc:
        return [f"cannot import {spec.module}: {exc}"]
    problems = []
    for name in ("eager_attention_forward", *spec.mask_builders):
        if not callable(getattr(module, name, None)):
            problems.append(f"{spec.module}.{name} is missing")
    if not hasattr(getattr(module, "ALL_ATTENTION_FUNCTIONS", None), "__getitem__"):
        problems.append(f"{spec.module}.ALL_ATTENTION_FUNCTIONS is missing")
    for cls_name in spec.entry_classes_in(module):
        cls = getattr(module, cls_name, None)
        if cls is None:
            problems.append(f"{spec.module}.{cls_name} is missing")
            continue
        params = inspect.signature(cls.forward).parameters
        for needed in ("attention_mask", "position_ids", "input_ids", "inputs_embeds"):
            if needed not in params:
                problems.append(f"{cls_name}.forward has no {needed!r} parameter")
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            problems.append(f"{cls_name}.forward takes no **kwargs")
    for cls_name in (spec.text_attention, spec.vision_attention):
        cls = getattr(module, cls_name, None)
        if cls is None:
            problems.append(f"{spec.module}.{cls_name} is missing")
        elif "ALL_ATTENTION_FUNCTIONS" not in _source(cls.forward):
            problems.append(f"{cls_name}.forward no longer resolves its attention through ALL_ATTENTION_FUNCTIONS")
    if spec.linear_attention is not None:
        cls = getattr(module, spec.linear_attention, None)
        if cls is None:
            problems.append(f"{spec.module}.{spec.linear_attention} is missing")
        elif "hidden_states" not in inspect.signature(cls.forward).parameters:
            problems.append(f"{spec.linear_attention}.forward has no 'hidden_states' parameter")
        if not _linear_mask_targets(spec, module):
            problems.append(f"none of {', '.join(spec.linear_attention_masks)} exists in {spec.module}")
    if spec.aux_loss is not None:
        fn = getattr(module, spec.aux_loss, None)
        if fn is None:
            # A release whose entry classes compute no router loss (GLM-4V-MoE on 4.57) has none to patch; one
            # whose entry classes still call it but no longer define it as a module global has moved it: refuse.
            if any(spec.aux_loss in _source(getattr(module, c)) for c in spec.entry_classes_in(module)):
                problems.append(f"{spec.module}.{spec.aux_loss} is missing")
        elif "attention_mask" not in inspect.signature(fn).parameters:
            problems.append(f"{spec.aux_loss} has no attention_mask parameter")
    return problems


def _linear_mask_targets(spec: FamilySpec, module) -> list[tuple[object, str]]:
    """(owner, attribute) of every linear-attention mask builder the installed release has."""
    targets = []
    for name in spec.linear_attention_masks:
        owner_name, _, attr = name.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        if owner is not None and callable(getattr(owner, attr, None)):
            targets.append((owner, attr))
    return targets


def _deepstack_classes(module) -> list[type]:
    """The module's own classes that define ``_deepstack_process`` (the text models of deepstack families)."""
    return [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == module.__name__ and "_deepstack_process" in obj.__dict__
    ]


def _apply_family(spec: FamilySpec, recorder: PatchRecorder, state: _dispatch.PatchState) -> None:
    module = spec.import_module()
    for cls_name in spec.entry_classes_in(module):
        cls = getattr(module, cls_name)
        recorder.setattr(cls, "forward", _dispatch.entry_forward(cls.forward, state))
        # The vision features' way in, by the collator's positions where it sent them (qwenvl.patches._visual).
        if "get_placeholder_mask" in cls.__dict__:  # transformers' own placeholder count check: skipped when checked
            recorder.setattr(cls, "get_placeholder_mask", _visual.placeholder_mask(cls.get_placeholder_mask, state))
        for name in ("get_image_features", "get_video_features"):
            if name in cls.__dict__:
                recorder.setattr(cls, name, _visual.features(getattr(cls, name), state))
    for cls in _deepstack_classes(module):
        recorder.setattr(cls, "_deepstack_process", _visual.deepstack(cls._deepstack_process, state))
    if spec.tower_reads_grid is not None:  # the grids stay on the host: this tower gets its device copy
        tower = getattr(module, spec.tower_reads_grid)
        recorder.setattr(tower, "forward", _visual.grid_to_device(tower.forward))
    for name in spec.mask_builders:
        recorder.setattr(module, name, _dispatch.mask_builder(getattr(module, name)))
    recorder.setattr(
        module, "ALL_ATTENTION_FUNCTIONS", _dispatch.DispatchingAttentionFunctions(module.ALL_ATTENTION_FUNCTIONS, state)
    )
    recorder.setattr(module, "eager_attention_forward", _dispatch.dispatcher(module.eager_attention_forward, state))
    if spec.aux_loss is not None and hasattr(module, spec.aux_loss):
        recorder.setattr(module, spec.aux_loss, _dispatch.aux_loss(getattr(module, spec.aux_loss)))
    if spec.linear_attention is not None:
        cls = getattr(module, spec.linear_attention)
        recorder.setattr(cls, "forward", _linear.linear_forward(cls.forward, state))
        for owner, attr in _linear_mask_targets(spec, module):
            # A method is wrapped on its class: the wrapper receives ``self`` among the arguments it passes on.
            recorder.setattr(owner, attr, _dispatch.mask_builder(getattr(owner, attr)))


def _register_implementation(recorder: PatchRecorder) -> None:
    from transformers import AttentionInterface

    # A fresh instance holds no local overrides, so it shows exactly the class-wide registry register() writes.
    registry = AttentionInterface()
    previous = registry[VARLEN_IMPLEMENTATION] if VARLEN_IMPLEMENTATION in registry else MISSING
    AttentionInterface.register(VARLEN_IMPLEMENTATION, _dispatch.varlen_only)
    recorder.add_undo(functools.partial(_restore_implementation, previous))


def _restore_implementation(previous) -> None:
    from transformers import AttentionInterface

    if previous is MISSING:
        # transformers has register() but no unregister: remove the one key register() added.
        del AttentionInterface._global_mapping[VARLEN_IMPLEMENTATION]
    else:
        AttentionInterface.register(VARLEN_IMPLEMENTATION, previous)


def _route_vision(model, recorder: PatchRecorder) -> None:
    """Put the model's vision tower on its single-call varlen path (its own cu_seqlens, non-causal)."""
    import transformers
    from packaging.version import Version

    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None:
        return
    current = vision_config._attn_implementation or ""
    # transformers 4.57 takes the varlen path only for the exact name flash_attention_2; 5.x for any name
    # containing "flash". Either way the call reaches our dispatcher, never the real flash kernel.
    wanted = "flash_attention_2" if Version(transformers.__version__) < Version("5.0.0") else VARLEN_IMPLEMENTATION
    if "flash" in current and (wanted == VARLEN_IMPLEMENTATION or current == wanted):
        return
    recorder.setattr(vision_config, "_attn_implementation", wanted)


def _per_model(model, recorder: PatchRecorder, options: PatchOptions) -> None:
    """What a patch changes on one model instance: its vision routing, compiled regions, fused loss."""
    spec = family_of_model(model)
    _route_vision(model, recorder)
    if options.fused_cross_entropy:
        from qwenvl.patches._loss import install_fused_loss

        install_fused_loss(model, recorder, aux_coef_key="router_aux_loss_coef" if spec.aux_loss else None)
    if options.compile:
        from qwenvl.patches._compile import compile_regions

        count = compile_regions(model, recorder, spec=spec)
        logger.info("qwenvl: compiled %d regions of %s", count, type(model).__name__)


def _options(model, options: PatchOptions | None, keywords: PatchOptions) -> PatchOptions:
    """The options of a ``patch`` call: ``options`` or the keywords (checked when made), not both."""
    if options is not None and keywords != PatchOptions():
        raise ValueError("pass the options as keywords or as options=PatchOptions(...), not both")
    options = keywords if options is None else options
    if options.compile and model is None:
        raise ValueError("compile=True compiles a model's layers: pass the model, qwenvl.patch(model, compile=True)")
    if options.fused_cross_entropy and model is None:
        raise ValueError(
            "fused_cross_entropy=True replaces a model's loss: pass the model, qwenvl.patch(model, fused_cross_entropy=True)"
        )
    return options


def _specs(model, families: Iterable[str] | None, version) -> list[FamilySpec]:
    """The families a ``patch`` call patches, each one the installed release has (else ``PatchError``)."""
    if model is not None:
        specs = [family_of_model(model)]
    elif families is not None:
        specs = [get_family(name) for name in families]
    else:
        specs = [spec for spec in FAMILIES.values() if spec.available(str(version))]
    lacking = [f"{s.name} (from {s.min_transformers})" for s in specs if not s.available(str(version))]
    if lacking:
        raise PatchError(f"transformers {version} has no {', '.join(lacking)}; nothing was changed")
    return specs


def _join_active(model, specs: list[FamilySpec], options: PatchOptions) -> PatchHandle:
    """Another handle on the active patch, which must have ``options``' backends and cover ``specs``."""
    for what, active, asked in (
        ("backend", _ACTIVE.state.backend, options.backend),
        ("linear_backend", _ACTIVE.state.linear_backend, options.linear_backend),
    ):
        if active != asked:
            raise ValueError(
                f"a qwenvl patch with {what} {active!r} is already active; revert it before patching with "
                f"{what} {asked!r}"
            )
    missing = [s.name for s in specs if s.name not in _ACTIVE.families]
    if missing:
        raise ValueError(f"a qwenvl patch for {_ACTIVE.families} is active; revert it before adding {missing}")
    own = PatchRecorder()
    try:
        if model is not None:
            _per_model(model, own, options)
    except BaseException:
        own.undo()
        raise
    return PatchHandle(_ACTIVE, own)


def patch(
    model=None,
    *,
    backend: str = "auto",
    families: Iterable[str] | None = None,
    linear_backend: str = "auto",
    compile: bool = False,
    fused_cross_entropy: bool = False,
    options: PatchOptions | None = None,
) -> PatchHandle:
    """Patch the Qwen-VL families for packed batches and return the handle (also a context manager).

    Args:
        model: optional model instance (or PEFT wrapper). Its family is patched (an unknown family raises
            ``UnknownFamilyError``) and its vision tower is routed to the varlen core.
        families: restrict to these family names (default: every supported family the installed transformers
            has, or the model's). A family the release lacks is refused when named.
        backend: the varlen attention backend ("auto" picks per call; ``qwenvl.attention.available_backends``).
        linear_backend: how hybrid families' linear-attention layers run packed rows (``qwenvl.patches._linear``).
        compile: compile each decoder layer and vision block of ``model`` on its own (``qwenvl.patches._compile``);
            needs ``model``. Reverting restores the eager forwards.
        fused_cross_entropy: in training with labels, ``model``'s loss from the final hidden states and
            ``lm_head.weight`` without the logits (``qwenvl.patches._loss``); needs ``model``.
        options: the four above as one ``qwenvl.options.PatchOptions`` (then leave them at their defaults); its
            fields are the names ``qwenvl train`` and ``qwenvl verify`` take too, and say the valid values.

    Calling it again while a patch is active returns another handle on the same patch (patching twice is
    harmless, and the patch stays until every handle is reverted); asking for a different backend or more
    families then is an error: revert first.
    """
    global _ACTIVE

    keywords = PatchOptions(
        backend=backend, linear_backend=linear_backend, compile=compile, fused_cross_entropy=fused_cross_entropy
    )
    options = _options(model, options, keywords)
    version = check_transformers_version()
    specs = _specs(model, families, version)
    if _ACTIVE is not None:
        return _join_active(model, specs, options)

    problems = [f"{spec.name}: {p}" for spec in specs for p in _check_family(spec)]
    if problems:
        raise PatchError(
            f"cannot patch on transformers {version} (nothing was changed):\n  " + "\n  ".join(problems)
        )

    state = _dispatch.PatchState(backend=options.backend, linear_backend=options.linear_backend)
    recorder, own = PatchRecorder(), PatchRecorder()
    try:
        _register_implementation(recorder)
        for spec in specs:
            _apply_family(spec, recorder, state)
        if model is not None:
            _per_model(model, own, options)
    except BaseException:
        own.undo()
        recorder.undo()
        raise
    _ACTIVE = _AppliedPatch(state, recorder, tuple(s.name for s in specs))
    logger.info("qwenvl: patched %s for packed batches (backend=%s)", ", ".join(_ACTIVE.families), options.backend)
    return PatchHandle(_ACTIVE, own)
