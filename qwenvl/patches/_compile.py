"""Regional compilation: each decoder layer and each vision block compiled on its own (``patch(model, compile=True)``).

Why regions: a whole Qwen-VL forward has data-dependent control flow (image placement, mrope positions) that
breaks graphs and recompiles; one decoder layer or vision block is a fixed sequence of matmuls, norms, rope and
one attention call, the same for every layer, so it compiles once and the many small elementwise ops fuse.

The regions are the model's ``_no_split_modules`` classes (transformers lists exactly the decoder layer and the
vision block there) and the rest of the vision tower's own modules around its blocks: the patch embedding, the
merger and the deepstack mergers (the family's ``projectors`` and ``deepstack_mergers``). In a layer holding a
linear-attention mixer (Qwen3.5's Gated DeltaNet) the mixer is left eager (its per-sample paths loop over the
boundaries, fla's kernels are their own) and the layer's other children are the regions: its two norms and its
MLP (or sparse-MoE block), three of every four layers' elementwise work. Every region's ``forward`` becomes::

    mark the packed token dimension of its tensor inputs dynamic  ->  torch.compile(original forward)

so the first batch compiles a graph whose token count is symbolic and later batches of other lengths and
other packings reuse it (``compile_stats`` counts the graphs). Inside, attention goes through the opaque
operator of ``qwenvl.attention._compiled`` (the dispatcher switches when ``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import functools
import types
import weakref

import torch

from qwenvl.packing import VarlenMeta

__all__ = ["compile_regions", "compile_stats"]


def compile_stats() -> dict[str, int]:
    """Counts for this process so far: ``graphs`` dynamo compiled; ``recompiles``; ``not_compiled``, frames dynamo
    set out to compile and then ran eagerly (its recompile limit hit, say: it logs one warning and goes on)."""
    from torch._dynamo.utils import counters

    return dict(
        graphs=int(counters["stats"]["unique_graphs"]),
        recompiles=int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
        not_compiled=int(counters["frames"]["total"] - counters["frames"]["ok"]),
    )


def _tower_regions(model, spec) -> list[torch.nn.Module]:
    """The vision tower's patch embedding and mergers (its preamble's and coda's matmuls and norms)."""
    if spec is None:
        return []
    tower = spec.vision_tower_in(model)
    if tower is None:
        return []
    regions = [getattr(tower, name, None) for name in ("patch_embed", *spec.projectors)]
    regions = [m for m in regions if isinstance(m, torch.nn.Module)]
    if spec.deepstack_mergers:
        regions.extend(getattr(tower, spec.deepstack_mergers, None) or ())
    return regions


def _regions(model, spec=None) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    base = getattr(model, "get_base_model", None)
    if base is not None:
        names |= set(getattr(base(), "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} lists no _no_split_modules: no regions to compile")
    linear_class = spec.linear_attention if spec is not None else None
    listed = [m for m in model.modules() if type(m).__name__ in names]
    ids = {id(m) for m in listed}
    # Innermost only: a listed module holding listed ones (5.25's Qwen3-Omni thinker lists its whole vision and
    # audio encoders beside their blocks and layers) is not a region; compiled whole, it would trace into its
    # blocks' regions (nested compilation fails) and through its data-dependent preamble.
    nests = {id(m) for m in listed if any(id(inner) in ids for inner in m.modules() if inner is not m)}
    regions = []
    for module in listed:
        if id(module) in nests:
            continue
        if linear_class is not None and _holds(module, linear_class):
            # the mixer stays eager; the layer's other parts (its norms and MLP or experts) are regions
            regions.extend(child for child in module.children() if not _holds(child, linear_class))
            continue
        regions.append(module)
    inside = {id(m) for region in regions for m in region.modules()}
    regions.extend(m for m in _tower_regions(model, spec) if id(m) not in inside)
    return regions


def _holds(module: torch.nn.Module, class_name: str) -> bool:
    return any(type(m).__name__ == class_name for m in module.modules())


def _mark_token_dims(tokens: int, values) -> None:
    for value in values:
        if isinstance(value, VarlenMeta):
            _mark_token_dims(tokens, (value.cu_seqlens, value.host_cu_seqlens))
        elif isinstance(value, (tuple, list)):
            _mark_token_dims(tokens, value)
        elif isinstance(value, torch.Tensor):
            if value.ndim == 1 and not value.dtype.is_floating_point:
                torch._dynamo.maybe_mark_dynamic(value, 0)  # boundaries: one more per sample
                continue
            for dim, size in enumerate(value.shape):
                if size == tokens:
                    torch._dynamo.maybe_mark_dynamic(value, dim)


_OWN_CODE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a region class's forward -> its copy


def _with_own_code(function):
    """``function`` with a code object of its own, the same copy every time. Dynamo keeps its graphs, and counts
    compilations against ``recompile_limit`` (8), per code object, then runs that code eagerly for the rest of
    the process, with one logged warning. transformers' decorated forwards share one code object
    (``deprecate_kwarg``'s ``wrapped_func``) across every class of every family, so a process that patched a
    third family (``qwenvl verify --compile``, a sweep, a notebook) ran its regions eagerly. With a copy per
    region class, each class counts its own compilations; its instances, and later patches of it, share its
    graphs."""
    copy = _OWN_CODE.get(function)
    if copy is not None:
        return copy
    copy = types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__ = function.__qualname__
    _OWN_CODE[function] = copy
    return copy


def _region_forward(compiled, original):
    @functools.wraps(original)
    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.ndim >= 2:
            _mark_token_dims(hidden.shape[-2], (*args, *kwargs.values()))
        return compiled(*args, **kwargs)

    return forward


def compile_regions(model, recorder, *, spec=None, mode=None) -> int:
    """Compile each region of ``model`` in place (recorded in ``recorder`` for undo); returns how many. ``spec``: the
    model's ``FamilySpec``, whose vision tower's patch embedding and mergers are regions too and whose
    ``linear_attention`` mixers stay eager. ``mode``: torch.compile's
    for every region, or a function of the region (``benchmarks/model_step.py``'s CUDA-graph rows give the text
    layers ``"reduce-overhead"``)."""
    regions = _regions(model, spec)
    for module in regions:
        original = module.forward
        function = getattr(original, "__func__", None)
        target = original if function is None else types.MethodType(_with_own_code(function), module)
        compiled = torch.compile(target, mode=mode(module) if callable(mode) else mode)
        if "forward" in module.__dict__:
            raise ValueError(f"{type(module).__name__} already has its own forward (compiled twice?)")
        module.forward = _region_forward(compiled, original)
        recorder.add_undo(functools.partial(module.__dict__.pop, "forward"))
    return len(regions)
