"""The collator's host metadata: everything the patched forward would otherwise ask the device for.

``PackedCollator`` (built for a model) computes on the host what the vision tower derives from ``grid_thw``
(transformers >= 5.15 takes it as ``image_*`` / ``video_*`` kwargs: ``qwenvl.data.vision_meta``) and the boundaries
of every cu_seqlens (``qwenvl.packing.HostMeta``). These tests prove, on the CPU, that the precomputed inputs are
the tower's own (outputs and gradients bit-identical with and without them), that the tower really reads each of
them (a wrong one changes the output), and that no boundary is read back from a tensor when the metadata is
there. The host syncs themselves are counted on CUDA (``test_training_step_host_syncs``) and, operator by
operator, on the CPU (``test_a_training_step_reads_nothing_back_on_the_cpu_either``, ``data_dependent.py``).
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

import qwenvl
from qwenvl.data.vision_meta import HOOKS_SINCE, VisionPreamble
from qwenvl.families import FAMILIES
from qwenvl.fixtures import tiny_model
from qwenvl.packing import HOST_KEY, VarlenMeta
from qwenvl.verify.batches import SampleSpec, make_sample, pack, split_by_media

VISION_FAMILIES = tuple(FAMILIES)
SPECS = (SampleSpec(text=7, image=(4, 6)), SampleSpec(text=5), SampleSpec(text=3, video=(2, 4, 4)), SampleSpec(text=4, image=(2, 2)))

# What transformers still does with the device's data where our code cannot reach, by family, as
# [(operator, count)] over the rows of SPECS (``split_by_media``: one row of all four samples; GLM-4V an image row
# and a video row). Nothing, since Qwen3-VL's join of its modalities' masks (``image_mask[visual_pos_masks]``, 2)
# is kept from running (``qwenvl.patches._visual.media_apart``); a release that adds one names it here.
UPSTREAM_DATA_DEPENDENT: dict[str, list[tuple[str, int]]] = {}


def _text_model_wrapped(model, family: str) -> bool:
    """Whether an entry class of this release holds the text model, where the features go in by index: not the
    Qwen3-Omni thinker before its inner model class existed (5.17: the thinker holds the text model itself)."""
    spec = FAMILIES[family]
    entries = spec.entry_classes_in(spec.import_module())
    return any(type(m).__name__ in entries and "language_model" in m._modules for m in model.modules())


def _inner_model(model):
    """The submodule of ``model`` that holds the text model (``XModel``), where that is not ``model`` itself."""
    return next((m for m in model.modules() if m is not model and "language_model" in m._modules), None)


def _model_and_rows(family: str):
    model = tiny_model(family, seed=3)
    if not FAMILIES[family].available():
        pytest.skip(f"{family} is not in this transformers release")
    gen = torch.Generator().manual_seed(5)
    rows = split_by_media(model.config, [make_sample(model.config, spec, generator=gen) for spec in SPECS])
    return model, [pack(model, row) for row in rows]


def _step(model, inputs_list) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = []
    with qwenvl.patch(model, backend="sdpa"):
        for inputs in inputs_list:
            out = model(**inputs).logits
            out.float().pow(2).mean().backward()
            logits.append(out.detach())
    return logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _preamble_or_skip(model) -> VisionPreamble:
    preamble = VisionPreamble.of(model)
    if preamble is None:
        pytest.skip(f"transformers takes the vision tower's inputs precomputed from {HOOKS_SINCE}")
    return preamble


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_precomputed_vision_inputs_are_the_towers_own(family):
    model, rows = _model_and_rows(family)
    _preamble_or_skip(model)
    with_host = [row.model_inputs("upstream") for row in rows]
    assert any(k.startswith(("image_", "video_")) and k.endswith("position_ids") for k in with_host[0]), sorted(with_host[0])
    logits, grads = _step(model, with_host)
    plain_logits, plain_grads = _step(model, [row.model_inputs("upstream", host=False) for row in rows])
    assert all(torch.equal(a, b) for a, b in zip(logits, plain_logits))
    assert grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads), [n for n in grads if not torch.equal(grads[n], plain_grads[n])][:3]


def _poisoned(value: torch.Tensor) -> torch.Tensor:
    if value.is_floating_point():
        return value.flip(0)
    return value.flip(0) if value.ndim == 1 else torch.zeros_like(value)


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_the_tower_reads_every_precomputed_input(family):
    """A wrong value in each precomputed tensor changes the logits: the tower takes it instead of recomputing."""
    model, rows = _model_and_rows(family)
    _preamble_or_skip(model)
    row = next(r for r in rows if r.image_grid_thw is not None)
    inputs = row.model_inputs("upstream")
    names = [k for k in inputs if k.startswith("image_") and k != "image_grid_thw" and "cu_" not in k and isinstance(inputs[k], torch.Tensor)]
    assert names, sorted(inputs)
    (expected,), _ = _step(model, [inputs])
    for name in names:
        (changed,), _ = _step(model, [{**inputs, name: _poisoned(inputs[name])}])
        assert not torch.equal(changed, expected), f"{family}: the tower ignored {name}"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_no_boundary_is_read_back_from_a_tensor_with_the_host_metadata(family, monkeypatch):
    model, rows = _model_and_rows(family)
    read_back = []
    real = VarlenMeta.from_cu_seqlens.__func__

    def spy(cls, cu_seqlens, **kwargs):
        if kwargs.get("host_offsets") is None:
            read_back.append(tuple(cu_seqlens.shape))
        return real(cls, cu_seqlens, **kwargs)

    monkeypatch.setattr(VarlenMeta, "from_cu_seqlens", classmethod(spy))
    with_host = [row.model_inputs("upstream") for row in rows]
    _step(model, with_host)
    if VisionPreamble.of(model) is not None:
        assert read_back == [], f"boundaries read back from the device: {read_back}"
    else:  # the tower builds its own cu_seqlens: its boundaries are read once per forward, the text's never
        assert all(len(shape) == 1 for shape in read_back)
    read_back.clear()
    _step(model, [{k: v for k, v in inputs.items() if k != HOST_KEY} for inputs in with_host])
    assert read_back, "the spy must see the boundaries read back without the host metadata"


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["loss", "fused_loss"])
@pytest.mark.parametrize("convention", ["upstream", "hf_positions"])
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_training_step_host_syncs(device, family, convention, fused, record_property):
    """One training step (forward, loss, backward) of a packed row with images, a video and text, in bf16, moved to
    the GPU as the trainer moves it: neither qwenvl nor the vision tower's preamble waits on the device. What
    transformers itself still syncs on (the placeholder check, the split sizes, masked_scatter's backward, deepstack
    masks, MoE dispatch) is recorded by site (``record_property``: the JUnit report, docs/benchmarks.md)."""
    from qwenvl.data import to_device
    from qwenvl.host_syncs import recording_host_syncs
    model, rows = _model_and_rows(family)
    model = model.to(device, torch.bfloat16).train()
    sites = []
    with qwenvl.patch(model, backend="torch", fused_cross_entropy=fused):
        for row in rows:
            inputs = row.with_pixels(torch.bfloat16).model_inputs(convention)
            inputs["labels"] = row.labels
            for attempt in ("warm-up", "measured"):
                batch = to_device(inputs, device)
                torch.cuda.synchronize()
                with recording_host_syncs() as caught:
                    model(**batch).loss.backward()
                model.zero_grad(set_to_none=True)
            sites += caught
    record_property("host_sync_sites", sites)
    ours = [s for s in sites if s.startswith("qwenvl/")]
    preamble = [s for s in sites if "vision_utils.py" in s] if VisionPreamble.of(model) is not None else []
    assert not ours, f"qwenvl waits on the device at {ours}"
    assert not preamble, f"the vision tower recomputed its inputs at {preamble}"
    if _text_model_wrapped(model, family) and VisionPreamble.of(model) is not None:
        # the named upstream operators (UPSTREAM_DATA_DEPENDENT, one sync each) and nothing else
        named = sum(n for _, n in UPSTREAM_DATA_DEPENDENT.get(family, []))
        assert len(sites) <= named, f"{len(sites)} host syncs, {named} named upstream: {sites}"


@pytest.mark.parametrize("offsets", [(0, 100, 164), (0, 1), (0, 64, 64, 65), (0, 0), (0, 200, 330, 331, 700)])
def test_the_host_chunk_table_is_flas(offsets):
    """The chunk table the fla glue hands over (built on the host) is what fla would build on the device."""
    from qwenvl.patches._linear import FLA_CHUNK, chunk_indices

    table = chunk_indices(offsets)
    expected = [[s, j] for s in range(len(offsets) - 1) for j in range(0, offsets[s + 1] - offsets[s], FLA_CHUNK)]
    assert table.tolist() == [[s, j // FLA_CHUNK] for s, j in expected]
    try:
        from fla.ops.utils.index import prepare_chunk_indices
    except ImportError:
        return  # fla is not installed here: the expectation above is its documented layout
    cu = torch.tensor(offsets, dtype=torch.long)
    assert torch.equal(prepare_chunk_indices(cu, FLA_CHUNK).cpu(), table)


# ---------------------------------------------------------------------------------------------------------
# Stable shapes: rows padded to a multiple with a filler segment that no loss sees.


def test_a_padded_row_ends_in_a_filler_segment_that_no_loss_sees():
    from qwenvl.data import PackedCollator

    items = [{"input_ids": torch.arange(n) + 3, "labels": torch.arange(n) + 3, "position_ids": torch.arange(n).expand(3, n)} for n in (40, 17, 66)]
    plain = PackedCollator()(items)
    padded = PackedCollator(pad_to_multiple_of=64, pad_token_id=7)(items)
    assert plain["input_ids"].shape[1] == 123 and padded["input_ids"].shape[1] == 128
    assert torch.equal(padded["input_ids"][:, :123], plain["input_ids"]) and bool((padded["input_ids"][:, 123:] == 7).all())
    assert torch.equal(padded["labels"][:, :123], plain["labels"]) and bool((padded["labels"][:, 123:] == -100).all())
    assert padded["attention_mask"].tolist() == [0, 40, 57, 123, 128]  # the filler is its own segment
    assert padded[HOST_KEY].padding == 5 and plain[HOST_KEY].padding == 0
    assert PackedCollator(pad_to_multiple_of=41)(items[:1])[HOST_KEY].padding == 1
    assert PackedCollator(pad_to_multiple_of=40)(items[:1])[HOST_KEY].padding == 0  # already a multiple
    lengths = {PackedCollator(pad_to_multiple_of=256)([it])["input_ids"].shape[1] for it in
               ({"input_ids": torch.zeros(n, dtype=torch.long), "labels": torch.zeros(n, dtype=torch.long),
                 "position_ids": torch.zeros(3, n, dtype=torch.long)} for n in range(100, 1100, 20))}
    assert lengths == {256, 512, 768, 1024, 1280}, "50 varied rows take 5 lengths"
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive number of tokens, got 0"):
        PackedCollator(pad_to_multiple_of=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe", "qwen3_5"])
def test_a_padded_row_equals_each_sample_alone(family):
    """Logits and every gradient of the real tokens by the rule; a padded row adds no loss term and no router-loss
    term (the MoE router loss of the padded row equals the unpadded one's)."""
    from qwenvl.tolerances import tolerance
    from qwenvl.verify.golden_runs import float64_copy
    from qwenvl.verify.runs import judge_runs, run_alone, run_packed

    model, rows = _model_and_rows(family)
    total = sum(row.input_ids.shape[1] for row in rows)
    weights = torch.randn(total, model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / total
    ref = run_alone(float64_copy(model), rows, weights)
    pt = run_alone(model, rows, weights)
    out = run_packed(model, rows, weights, pad_to_multiple_of=64, backend="sdpa")
    verdict = judge_runs(tolerance("cpu", torch.float32), out, ref, pt)
    assert verdict.passed, verdict
    if FAMILIES[family].aux_loss is not None:
        ref64 = float64_copy(model)
        with qwenvl.patch(ref64, backend="sdpa"):
            aux = [ref64(**rows[0].model_inputs(pad_to_multiple_of=m), output_router_logits=True).aux_loss for m in (None, 64)]
        assert rows[0].model_inputs(pad_to_multiple_of=64)["input_ids"].shape[1] % 64 == 0
        torch.testing.assert_close(aux[1], aux[0], rtol=1e-12, atol=0)  # float64: the same tokens counted


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_the_placeholder_masks_do_not_depend_on_the_features(family):
    """The patch skips transformers' placeholder count check (two host syncs per modality) by calling
    ``get_placeholder_mask`` without the features once the collator has counted on the host: that is exact only
    while the masks never depend on the features, which this release is held to here."""
    model, rows = _model_and_rows(family)
    owner = next((m for m in (model, getattr(model, "model", None)) if m is not None and "get_placeholder_mask" in type(m).__dict__), None)
    if owner is None:
        pytest.skip(f"{family} has no get_placeholder_mask on this release")
    row = next(r for r in rows if r.image_grid_thw is not None)
    inputs = row.model_inputs("upstream", host=False)
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    merge = model.config.vision_config.spatial_merge_size ** 2
    features = {"image_features": torch.zeros(int(row.image_grid_thw.prod(-1).sum()) // merge, embeds.shape[-1])}
    if row.video_grid_thw is not None:
        features["video_features"] = torch.zeros(int(row.video_grid_thw.prod(-1).sum()) // merge, embeds.shape[-1])
    with_features = owner.get_placeholder_mask(ids, embeds, **features)
    without = owner.get_placeholder_mask(ids, embeds)
    assert len(with_features) == len(without) and all(torch.equal(a, b) for a, b in zip(with_features, without))


def test_the_placeholder_check_moves_to_the_host(monkeypatch):
    """A row whose placeholders and grids disagree is refused by the collator, on the host; a checked row's forward
    skips transformers' check, and an ordinary forward afterwards runs it again."""
    model, rows = _model_and_rows("qwen2_5_vl")
    _preamble_or_skip(model)  # the check is the vision preamble's (VisionPreamble.check_placeholders)
    row = next(r for r in rows if r.image_grid_thw is not None)
    items = [dict(item) for item in row.items]
    first = next(i for i, item in enumerate(items) if "image_grid_thw" in item)
    ids = items[first]["input_ids"].clone()
    ids[ids == model.config.image_token_id] = 5  # every image placeholder turned into text
    items[first]["input_ids"] = ids
    from qwenvl.data import PackedCollator

    with pytest.raises(ValueError, match=r"a packed row holds 1 image placeholder tokens but its image grids give 7 features"):
        PackedCollator.for_model(model)(items)
    calls = []
    owner = model.model
    real = type(owner).get_placeholder_mask

    @functools.wraps(real)  # the patch reads the method's parameters through its signature
    def spy(self, *args, **kwargs):
        bound = inspect.signature(real).bind(self, *args, **kwargs)
        calls.append(any(v is not None for k, v in bound.arguments.items() if k.endswith("_features")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(owner), "get_placeholder_mask", spy)
    with qwenvl.patch(model, backend="sdpa"), torch.no_grad():
        model(**row.model_inputs("upstream"))
        assert calls and not any(calls), "a checked row ran transformers' count check"
        calls.clear()
        model(**row.model_inputs("upstream", host=False))
        assert calls and all(calls), "a row without host metadata must keep transformers' check"


@pytest.mark.parametrize("family", [f for f in VISION_FAMILIES if FAMILIES[f].deepstack_mergers])
def test_deepstack_adds_by_index_with_the_collators_positions(family, monkeypatch):
    """With the collator's placeholder positions, deepstack's features go in by index, never through the original
    boolean-mask code (two host syncs a layer, and more in the backward); without them the original runs. The
    outputs of both are bit-identical (``test_precomputed_vision_inputs_are_the_towers_own``)."""
    import qwenvl.patches as patches

    model, rows = _model_and_rows(family)
    _preamble_or_skip(model)
    classes = patches._deepstack_classes(FAMILIES[family].import_module())
    assert classes, f"{family} names deepstack mergers but its module has no _deepstack_process"
    calls = []
    for cls in classes:
        real = cls._deepstack_process

        def spy(self, *args, _real=real, **kwargs):
            calls.append(type(self).__name__)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "_deepstack_process", spy)
    row = next(r for r in rows if r.image_grid_thw is not None)
    _step(model, [row.model_inputs("upstream")])
    assert calls == [], f"the boolean-mask deepstack ran {len(calls)} times with the collator's positions"
    _step(model, [row.model_inputs("upstream", host=False)])
    assert calls, "without the positions the original deepstack must run"


@pytest.mark.parametrize("fused", [False, True], ids=["loss", "fused_loss"])
@pytest.mark.parametrize("convention", ["upstream", "hf_positions"])
@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_a_training_step_reads_nothing_back_on_the_cpu_either(family, convention, fused):
    """The CPU's view of ``test_training_step_host_syncs``: a training step (forward, loss, backward) of each packed
    row with the collator's metadata runs no operator whose result the host must wait for (``DataDependentOps``),
    but for the named upstream ones; without the metadata it runs several (the detector sees them)."""
    from collections import Counter

    from data_dependent import DataDependentOps

    model, rows = _model_and_rows(family)
    _preamble_or_skip(model)
    if not _text_model_wrapped(model, family):
        pytest.skip("its text model sits in a class qwenvl does not wrap here: masked_scatter's syncs stay")
    seen = Counter()
    for row in rows:
        inputs = row.model_inputs(convention)
        with qwenvl.patch(model, backend="sdpa", fused_cross_entropy=fused), DataDependentOps(host=inputs[HOST_KEY].grids.values()) as mode:
            model(**inputs, labels=row.labels).loss.backward()
        seen.update(mode.seen)
    by_op = sorted(Counter(op for (op, _), n in seen.items() for _ in range(n)).items())
    assert by_op == UPSTREAM_DATA_DEPENDENT.get(family, []), f"data-dependent operators: {dict(seen)}"
    row = max(rows, key=lambda r: len(r.items))
    with qwenvl.patch(model, backend="sdpa"), DataDependentOps() as mode:
        model(**row.model_inputs("upstream", host=False), labels=row.labels).loss.backward()
    assert mode.seen, "without the collator's metadata the detector must see the tower read its grids back"


@pytest.mark.parametrize("linear_backend", ["segments", "batched", "torch"])
@pytest.mark.parametrize("family", [name for name in VISION_FAMILIES if FAMILIES[name].linear_attention])
def test_the_linear_attention_paths_read_nothing_back(family, linear_backend):
    """Every exact Gated DeltaNet path (fla's needs CUDA: its chunk table is built on the host, test_the_host_chunk_
    table_is_flas) runs a training step without a data-dependent operator (``DataDependentOps``)."""
    from data_dependent import DataDependentOps

    model, rows = _model_and_rows(family)
    row = max(rows, key=lambda r: len(r.items))
    inputs = row.model_inputs("upstream")
    with qwenvl.patch(model, backend="sdpa", linear_backend=linear_backend), DataDependentOps(host=inputs[HOST_KEY].grids.values()) as mode:
        model(**inputs, labels=row.labels).loss.backward()
    assert mode.seen == []
    with qwenvl.patch(model, backend="sdpa", linear_backend=linear_backend), DataDependentOps() as mode:
        model(**row.model_inputs("upstream", host=False), labels=row.labels).loss.backward()
    assert mode.seen, "without the collator's metadata the boundaries are read back (the detector must see it)"


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_the_features_gradient_is_gathered_by_index_not_masked_select(family, monkeypatch):
    """With the collator's positions, ``masked_scatter`` gets the vision features detached (its backward would
    select their gradient through a boolean mask: a host sync per modality) and the gradient reaches the tower by
    index at the text model's entry: bit-identical to the original (``test_precomputed_vision_inputs_...``). The
    model's returned ``image_outputs`` still hold the live features; without the positions, nothing changes."""
    model, rows = _model_and_rows(family)
    _preamble_or_skip(model)
    if not _text_model_wrapped(model, family):
        pytest.skip(f"{family}: no entry class holds the text model here; masked_scatter's gradient (a sync) stays")
    seen = []
    real = torch.Tensor.masked_scatter

    def spy(self, mask, source):
        seen.append(source.requires_grad)
        return real(self, mask, source)

    monkeypatch.setattr(torch.Tensor, "masked_scatter", spy)
    row = next(r for r in rows if r.image_grid_thw is not None)
    with qwenvl.patch(model, backend="sdpa"):
        out = model(**row.model_inputs("upstream"), output_hidden_states=False)
        assert seen and not any(seen), f"masked_scatter got features that require grad: {seen}"
        for name in ("image_outputs", "video_outputs"):  # the videos' computed apart too (media_apart)
            pooled = getattr(getattr(out, name, None), "pooler_output", None)
            if pooled is not None:
                assert all(t.requires_grad for t in pooled), f"the returned {name} lost their gradient"
        seen.clear()
        plain = model(**row.model_inputs("upstream", host=False))
        assert seen and all(seen), "without the collator's positions masked_scatter must get the live features"
        for name in ("image_outputs", "video_outputs"):  # returned where the original returns them
            assert (getattr(out, name, None) is None) == (getattr(plain, name, None) is None), name
        inner = _inner_model(model)
        if inner is not None:  # the class holding the text model, called directly (return_dict its own decorator's)
            out = inner(**row.model_inputs("upstream"), return_dict=True)
            plain = inner(**row.model_inputs("upstream", host=False), return_dict=True)
            for name in ("image_outputs", "video_outputs"):
                assert (getattr(out, name, None) is None) == (getattr(plain, name, None) is None), f"inner {name}"


def test_a_forward_of_its_own_never_sees_the_last_ones_host_metadata():
    """A VarlenMeta handed to the model directly starts a forward of its own: the placeholder positions and the
    skipped check of the collator's previous row must not apply to it (the same samples in another order would get
    deepstack features at the old row's positions)."""
    from qwenvl.data import PackedCollator
    from qwenvl.packing import VarlenMeta

    model, rows = _model_and_rows("qwen3_vl")
    row = next(r for r in rows if r.image_grid_thw is not None)
    collated = PackedCollator.for_model(model)(row.items)
    reordered = PackedCollator()(row.items[::-1])
    for batch in (collated, reordered):
        batch.pop("labels")
    direct = {k: v for k, v in reordered.items() if k != HOST_KEY}
    direct["attention_mask"] = VarlenMeta.from_cu_seqlens(direct["attention_mask"])
    with qwenvl.patch(model, backend="sdpa"), torch.no_grad():
        fresh = model(**direct).logits
        model(**collated)
        after = model(**direct).logits
    assert torch.equal(after, fresh)


def test_a_row_mixing_media_where_one_placeholder_serves_both_is_refused_by_the_collator():
    from qwenvl.data import PackedCollator
    from qwenvl.positions import rope_index

    model = tiny_model("glm4v", seed=3)
    gen = torch.Generator().manual_seed(5)
    samples = [make_sample(model.config, spec, generator=gen) for spec in (SampleSpec(6, image=(4, 4)), SampleSpec(5, video=(2, 4, 4)))]
    items = [s.item(rope_index(model, s.input_ids[None], image_grid_thw=s.image_grid_thw, video_grid_thw=s.video_grid_thw)[:, 0]) for s in samples]
    if VisionPreamble.of(model) is None:
        pytest.skip(f"the collator counts placeholders where transformers takes the tower's inputs ({HOOKS_SINCE}+)")
    with pytest.raises(ValueError, match="glm4v fills images and videos with one placeholder"):
        PackedCollator.for_model(model)(items)


def test_sync_sites_are_named_from_the_package_folders():
    # a virtualenv under a folder named torch, a checkout under one named qwenvl: each site keeps its own package
    from qwenvl.host_syncs import short_site

    venv = "/opt/torch/.venv/lib/python3.12/site-packages"
    assert short_site(f"{venv}/torch/cuda/__init__.py:1270") == "torch/cuda/__init__.py:1270"
    assert short_site(f"{venv}/transformers/models/glm4v/modeling_glm4v.py:9") == "transformers/models/glm4v/modeling_glm4v.py:9"
    assert short_site("/src/qwenvl/qwenvl/patches/_visual.py:3") == "qwenvl/patches/_visual.py:3"
    assert short_site("/src/qwenvl/parity_tests/test_host_meta.py:4") == "parity_tests/test_host_meta.py:4"
