"""Regional compilation (``qwenvl.patch(model, compile=True)``): exact, reversible, and compiled once.

Each decoder layer and vision block is compiled on its own with the packed token dimension dynamic, and the
varlen attention inside runs as one opaque operator (``qwenvl.attention._compiled``). These tests run the
compiler on CPU (inductor's C++ backend); the GPU suite runs them again on CUDA with the torch varlen kernel.
"""

from __future__ import annotations

import pytest
import torch

import qwenvl
from qwenvl.families import FAMILIES
from qwenvl.fixtures import tiny_model
from qwenvl.patches._compile import compile_stats
from qwenvl.verify.batches import SampleSpec, make_sample, pack
from qwenvl.verify.parity import DEFAULT_SPECS, run_case

pytestmark = pytest.mark.slow


def _host_preamble_or_skip(model) -> None:
    """Before transformers 5.15 a vision tower computes its boundaries from ``grid_thw`` on the device (no hooks
    to hand them in): its compiled blocks read them back, and a new image grid recompiles them."""
    from qwenvl.data.vision_meta import HOOKS_SINCE, VisionPreamble

    if VisionPreamble.of(model) is None:
        pytest.skip(f"transformers takes the vision tower's inputs precomputed from {HOOKS_SINCE}")


def _backend_and_dtype(device):
    return ("sdpa", torch.float32) if device.type == "cpu" else ("torch", torch.bfloat16)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen3_vl_moe", "qwen3_omni_moe_thinker"])
def test_compiled_packed_equals_each_sample_alone(family, device):
    # qwen2_5_vl: window and full vision blocks; qwen3_vl: deepstack; qwen3_5: its Gated DeltaNet mixers stay
    # eager, their layers' norms and MLPs compiled; qwen3_vl_moe: compiled experts under the harness's pinned
    # routing (its router runs eagerly); the Omni thinker: on 5.25 its encoders are listed beside their blocks.
    # Judged compiled only if it compiled: in a process that has compiled two other families before (a worker of
    # this suite, qwenvl verify --compile) dynamo's recompile limit used to turn the regions eager, silently.
    backend, dtype = _backend_and_dtype(device)
    specs = DEFAULT_SPECS if device.type == "cuda" else [s for s in DEFAULT_SPECS if s.video is None]
    before = compile_stats()
    result = run_case(family, backend=backend, device=device, dtype=dtype, specs=specs, compile=True)
    assert result.passed, result
    # run_case itself fails a packed run that left a frame eager (test_a_compiled_case_that_ran_eagerly_fails); its
    # compiled yardstick, the unpatched model, may leave some (transformers' own data-dependent code) and counts here
    assert compile_stats()["graphs"] > before["graphs"], "the compiled case compiled nothing: it ran eagerly"


def test_the_fused_loss_of_a_compiled_case_is_judged_against_the_compiled_way_too():
    """Judged on the loss (one scalar) a compiled bf16 case needs the compiled way done plainly as a yardstick:
    on this draw the packed loss is 3.2x the eager yardstick's error (two independent roundings) and 1.1x the
    compiled unpatched model's, with every gradient within 1% of its bound."""
    result = run_case("qwen3_5_moe", backend="sdpa", device=torch.device("cpu"), dtype=torch.bfloat16,
                      specs=DEFAULT_SPECS, compile=True, fused_cross_entropy=True, seed=0)
    assert result.passed, result


def test_a_compiled_case_that_ran_eagerly_fails():
    """A compiled verify case that dynamo ran eagerly (here: a recompile limit of 1, which the second batch's
    dynamic shapes exceed) is an error, never a pass judged on the eager run."""
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(Exception, match="recompile_limit|run compiled"):
        run_case("qwen2_vl", backend="sdpa", device=torch.device("cpu"), dtype=torch.float32,
                 specs=[s for s in DEFAULT_SPECS if s.video is None], compile=True)


BATCHES = [
    [SampleSpec(9, image=(4, 4)), SampleSpec(23)],
    [SampleSpec(5), SampleSpec(12, image=(2, 6)), SampleSpec(3)],
    [SampleSpec(40), SampleSpec(7, image=(4, 2))],
    [SampleSpec(17, image=(2, 2)), SampleSpec(1), SampleSpec(30), SampleSpec(8)],
    # after the warm-up above: other lengths, other sample counts, other image grids
    [SampleSpec(11), SampleSpec(13, image=(6, 4))],
    [SampleSpec(29, image=(2, 4)), SampleSpec(2), SampleSpec(6), SampleSpec(9), SampleSpec(15)],
    [SampleSpec(64, image=(4, 6))],
    [SampleSpec(3), SampleSpec(4, image=(2, 2)), SampleSpec(21, image=(4, 4))],
]
WARM_UP = 4


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_varied_batches_do_not_recompile(device, family):
    # The graphs are made during the first few batches (automatic dynamic shapes settle on symbolic token counts
    # and segment counts); after that, no batch compiles again however its lengths and packing differ. Qwen3-VL:
    # its tower's regions too (patch embedding, merger, deepstack mergers).
    # From empty caches, as in a fresh process: no graph count stays flat because dynamo gave up (its recompile
    # limit, hit by this worker's earlier families, runs the regions eagerly), which the last line checks.
    torch._dynamo.reset()
    model = tiny_model(family).to(device)
    _host_preamble_or_skip(model)
    gen = torch.Generator().manual_seed(0)
    graphs, before = [], compile_stats()
    with qwenvl.patch(model, compile=True):
        for specs in BATCHES:
            batch = pack(model, [make_sample(model.config, s, generator=gen) for s in specs]).to(device)
            model(**batch.model_inputs(), use_cache=False).logits.sum().backward()
            graphs.append(compile_stats()["graphs"])
    assert graphs[WARM_UP - 1] > before["graphs"], graphs
    assert graphs[WARM_UP:] == [graphs[WARM_UP - 1]] * (len(BATCHES) - WARM_UP), f"graphs after each batch: {graphs}"
    assert compile_stats()["not_compiled"] == before["not_compiled"], "some regions ran eagerly"


def test_a_process_that_patches_again_keeps_compiling():
    """Dynamo compiles a code object at most ``recompile_limit`` times a process, then runs it eagerly. Each region
    class compiles through code of its own, so patching model after model (a sweep, a notebook,
    ``qwenvl verify --compile``) never runs the later ones eagerly (here a hard error, not a warning), and a
    family patched again reuses its graphs."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    graphs = {}
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for family in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "qwen2_vl"]:
            model = tiny_model(family)
            before = compile_stats()
            with qwenvl.patch(model, compile=True):
                for specs in BATCHES[:3]:
                    batch = pack(model, [make_sample(model.config, s, generator=gen) for s in specs])
                    model(**batch.model_inputs(), use_cache=False).logits.sum().backward()
            after = compile_stats()
            assert after["not_compiled"] == before["not_compiled"], (family, before, after)
            graphs.setdefault(family, []).append(after["graphs"] - before["graphs"])
    assert all(graphs[f][0] > 0 for f in graphs) and graphs["qwen2_vl"][1] == 0, graphs


def test_compiled_vision_blocks_take_the_collators_boundaries(monkeypatch):
    # Inside a compiled vision block the attention gets the tower's device cu_seqlens only: the operator must find
    # the host boundaries the collator sent (no read-back, no host sync), and read back only without them.
    import qwenvl.attention._compiled as compiled
    from qwenvl.packing import HOST_KEY

    torch._dynamo.reset()  # a fresh compile: a worker's earlier tests may have used up the recompile limit (eager then)
    read: list[int] = []
    real = compiled._read_back
    monkeypatch.setattr(compiled, "_read_back", lambda cu: read.append(cu.numel()) or real(cu))
    model = tiny_model("qwen2_5_vl")
    _host_preamble_or_skip(model)
    gen = torch.Generator().manual_seed(0)
    batch = pack(model, [make_sample(model.config, s, generator=gen) for s in BATCHES[0]])
    with qwenvl.patch(model, compile=True):
        model(**batch.model_inputs(), use_cache=False).logits.sum().backward()
        assert read == [], f"boundaries read back from the device: {read}"
        inputs = {k: v for k, v in batch.model_inputs().items() if k != HOST_KEY}
        model(**inputs, use_cache=False).logits.sum().backward()
    assert read, "without the collator's metadata the operator reads the tower's boundaries back"


def test_compile_is_reverted_with_the_patch():
    model = tiny_model("qwen2_vl")
    regions = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    with qwenvl.patch(model, compile=True):
        assert regions and all("forward" in m.__dict__ for m in regions)
    assert all("forward" not in m.__dict__ for m in model.modules())
    ids = torch.randint(3, 400, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_model("qwen2_vl")(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_the_tower_is_compiled_around_its_blocks_too(family):
    """The patch embedding, the merger (GLM-4V: and its downsample conv) and the deepstack mergers are regions
    as well as the blocks: what runs before and after the blocks is compiled too."""
    spec = FAMILIES[family]
    model = tiny_model(family)
    tower = getattr(model.model, spec.vision_tower)
    wanted = [tower.patch_embed, *(getattr(tower, p) for p in spec.projectors)]
    wanted += list(getattr(tower, spec.deepstack_mergers)) if spec.deepstack_mergers else []
    with qwenvl.patch(model, compile=True):
        missing = [type(m).__name__ for m in wanted if "forward" not in m.__dict__]
        assert not missing, f"not compiled: {missing}"
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_region_holds_another(family):
    """Regions are disjoint: a compiled region tracing into another region's wrapper fails (dynamo refuses
    ``maybe_mark_dynamic`` inside a trace), so a listed module holding listed ones is left out for its parts."""
    from qwenvl.patches._compile import _regions

    spec = FAMILIES[family]
    regions = _regions(tiny_model(family), spec)
    ids = {id(r) for r in regions}
    holding = [type(r).__name__ for r in regions if any(id(m) in ids for m in r.modules() if m is not r)]
    assert regions and not holding, holding


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_a_linear_attention_layer_is_compiled_around_its_mixer(family):
    """In a layer holding a Gated DeltaNet the mixer stays eager and the layer's norms and MLP (experts) are
    regions; full-attention layers are compiled whole."""
    linear = FAMILIES[family].linear_attention
    model = tiny_model(family)
    layers = model.model.language_model.layers
    kinds = {getattr(layer, "block_type", None) for layer in layers}
    assert kinds == {"linear_attention", "full_attention"}, kinds
    with qwenvl.patch(model, compile=True):
        for layer in layers:
            if layer.block_type == "full_attention":
                assert "forward" in layer.__dict__
                continue
            assert "forward" not in layer.__dict__
            assert all("forward" not in m.__dict__ for m in layer.modules() if type(m).__name__ == linear)
            parts = [name for name, child in layer.named_children() if "forward" in child.__dict__]
            assert sorted(parts) == ["input_layernorm", "mlp", "post_attention_layernorm"], parts
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_compile_needs_a_model():
    with pytest.raises(ValueError, match=r"compile=True compiles a model's layers: pass the model"):
        qwenvl.patch(compile=True)
