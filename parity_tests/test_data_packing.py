"""The packer and the collators: properties over drawn datasets, and packed == padded on every family.

Samples here are built by ``qwenvl.verify.batches`` (random tokens and pixels laid out as the processors lay
them, with each sample's own ``get_rope_index`` positions); the real processors and files are exercised by
``test_dataset.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qwenvl
from qwenvl.data import PackedCollator, PackedDataset, PaddedCollator, pack, pack_shards
from qwenvl.families import FAMILIES, available_families
from qwenvl.fixtures import tiny_model
from qwenvl.positions import mm_token_type_ids, rope_index
from qwenvl.tolerances import judge, reference_dtype, tolerance
from qwenvl.verify.batches import SampleSpec, UpstreamLimit, make_sample, mixes_media, runnable_specs, upstream_limit

# ---------------------------------------------------------------------------------------------------------
# The packer


def _first_fit(lengths, budget, order):
    """First fit by a plain scan: the specification the packer's segment tree must match."""
    rows, room = [], []
    for i in order:
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=80),
    budget=st.integers(64, 200),
    seed=st.integers(0, 2**16),
)
def test_packer_invariants(lengths, budget, seed):
    packing = pack(lengths, budget, seed=seed)
    placed = sorted(i for row in packing.rows for i in row)
    assert placed == list(range(len(lengths))), "every sample exactly once"
    assert all(packing.row_tokens(r) <= budget for r in range(len(packing.rows)))
    assert pack(lengths, budget, seed=seed) == packing, "deterministic for a seed"
    # first-fit-decreasing: the same rows as a plain first-fit scan over the sorted order (row order aside)
    plain = pack(lengths, budget, seed=seed, shuffle_rows=False)
    decreasing = [i for row in plain.rows for i in row]
    by_length = sorted(decreasing, key=lambda i: -lengths[i])
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], by_length.index(i)))
    assert [list(r) for r in plain.rows] == _first_fit(lengths, budget, order)
    assert sorted(packing.rows) == sorted(plain.rows)
    # no two rows could be merged: first fit never leaves two rows that fit in one
    loads = sorted(packing.row_tokens(r) for r in range(len(packing.rows)))
    assert len(loads) < 2 or loads[0] + loads[1] > budget
    assert 0 < packing.fill_ratio <= 1


def test_packer_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="sample 2 has 30 tokens, more than the packing budget of 20"):
        pack([5, 6, 30], 20)
    with pytest.raises(ValueError, match="sample 1 has 0 tokens"):
        pack([5, 0], 20)
    with pytest.raises(ValueError, match="budget must be a positive"):
        pack([5], 0)


def test_packer_example_from_the_docstring():
    packing = pack([9, 7, 5, 4, 3], 16, shuffle_rows=False)
    assert packing.rows == ((0, 1), (2, 3, 4))
    assert packing.fill_ratio == pytest.approx(28 / 32)


@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60),
    data=st.data(),
    shards=st.integers(1, 3),
)
def test_packer_never_mixes_groups(lengths, data, shards):
    # GLM-4V: samples with a video (group 1) never share a row with samples with an image (group 0).
    groups = data.draw(st.lists(st.integers(0, 1), min_size=len(lengths), max_size=len(lengths)))
    if len(lengths) < shards:
        return  # too few samples to give every rank a row
    packing = pack(lengths, 128, seed=1, groups=groups) if shards == 1 else pack_shards(lengths, 128, shards, groups=groups)
    rows = packing.rows
    assert {i for row in rows for i in row} == set(range(len(lengths))), "every sample placed"
    assert all(len({groups[i] for i in row}) == 1 for row in rows), "no row mixes groups"
    if shards == 1:
        alone = [pack([lengths[i] for i in range(len(lengths)) if groups[i] == g], 128) for g in set(groups)]
        assert len(rows) == sum(len(p.rows) for p in alone), "each group packed as tightly as on its own"


# ---------------------------------------------------------------------------------------------------------
# The collators


_MODELS: dict[str, torch.nn.Module] = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def _item(model, spec: SampleSpec, gen: torch.Generator) -> dict:
    """A dataset item (the form SupervisedDataset yields) with text labels on a random half of the tokens."""
    s = make_sample(model.config, spec, generator=gen)
    ids = s.input_ids
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.5, ids, torch.full_like(ids, -100))
    labels[mm_token_type_ids(model.config, ids[None])[0] > 0] = -100  # image and video placeholders
    item = {"input_ids": ids, "labels": labels}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if getattr(s, key) is not None:
            item[key] = getattr(s, key)
    item["position_ids"] = rope_index(
        model, ids[None], image_grid_thw=item.get("image_grid_thw"), video_grid_thw=item.get("video_grid_thw")
    )[:, 0]
    return item


@st.composite
def datasets(draw, *, max_samples=6):
    family = draw(st.sampled_from(available_families()))
    specs = []
    for _ in range(draw(st.integers(1, max_samples))):
        image = draw(st.one_of(st.none(), st.tuples(st.sampled_from([2, 4]), st.sampled_from([2, 4]))))
        video = draw(st.one_of(st.none(), st.none(), st.just((2, 2, 4))))
        specs.append(SampleSpec(text=draw(st.integers(0 if image or video else 1, 40)), image=image, video=video))
    return family, specs, draw(st.integers(0, 2**16))


@given(data=datasets(), convention=st.sampled_from(["upstream", "hf_positions"]))
def test_packed_collator_properties(data, convention):
    family, specs, seed = data
    specs = runnable_specs(family, specs)  # GLM-4V: no sample holds an image and a video
    model = _model(family)
    gen = torch.Generator().manual_seed(seed)
    items = [_item(model, spec, gen) for spec in specs]
    batch = PackedCollator(convention)([items])  # one packed row, as PackedDataset yields it
    lengths = [it["input_ids"].numel() for it in items]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    T = sum(lengths)
    assert batch["input_ids"].shape == (1, T)
    if convention == "upstream":
        assert batch["attention_mask"].dtype == torch.int32
        assert batch["attention_mask"].tolist() == [0, *[sum(lengths[: i + 1]) for i in range(len(lengths))]]
        rows = batch["position_ids"][:, 0]
    else:
        assert "attention_mask" not in batch and batch["position_ids"].shape == (4, 1, T)
        text = batch["position_ids"][0, 0]
        assert text.tolist() == [p for n in lengths for p in range(n)]
        rows = batch["position_ids"][1:, 0]
    for it, start, n in zip(items, starts, lengths):
        assert torch.equal(rows[:, start : start + n], it["position_ids"]), "each sample keeps its own positions"
        assert batch["labels"][0, start] == -100, "no label predicts across a sample boundary"
        assert torch.equal(batch["labels"][0, start + 1 : start + n], it["labels"][1:])
    merge = model.config.vision_config.spatial_merge_size ** 2
    types = mm_token_type_ids(model.config, batch["input_ids"])  # GLM-4V: video frames hold the image placeholder
    for kind, grids in ((1, "image_grid_thw"), (2, "video_grid_thw")):
        n_tokens = int((types == kind).sum())
        expected = int(batch[grids].prod(-1).sum()) // merge if grids in batch else 0
        assert n_tokens == expected, f"{grids}: tokens match the grids"
    for key in ("pixel_values", "pixel_values_videos"):
        present = [it[key] for it in items if key in it]
        assert torch.equal(batch[key], torch.cat(present)) if present else key not in batch


def test_hf_kwargs_rows_are_hf_positions_rows_plus_the_flash_kwargs():
    items = [
        {"input_ids": torch.arange(n), "labels": torch.arange(n), "position_ids": torch.arange(n).expand(3, n)}
        for n in (4, 7, 2)
    ]
    positions_row, kwargs_row = PackedCollator("hf_positions")(items), PackedCollator("hf_kwargs")(items)
    flash = {k: kwargs_row.pop(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    assert kwargs_row.keys() == positions_row.keys()
    assert kwargs_row.pop("qwenvl_host") == positions_row.pop("qwenvl_host")
    assert all(torch.equal(kwargs_row[k], positions_row[k]) for k in kwargs_row)
    expected = torch.tensor([0, 4, 11, 13], dtype=torch.int32)
    assert torch.equal(flash["cu_seq_lens_q"], expected) and torch.equal(flash["cu_seq_lens_k"], expected)
    assert flash["max_length_q"] == flash["max_length_k"] == 7


def test_collators_refuse_what_they_cannot_take():
    with pytest.raises(ValueError, match="unknown packing convention 'flat'; choose one of upstream, hf_positions, hf_kwargs"):
        PackedCollator("flat")
    with pytest.raises(TypeError, match="samples .* or packed rows"):
        PackedCollator()([torch.zeros(3)])
    with pytest.raises(ValueError, match="at least one sample"):
        PaddedCollator(0)([])


# ---------------------------------------------------------------------------------------------------------
# Packed == padded, every family: token-mean loss and every parameter gradient, by the tolerance rule.

SPECS = (
    SampleSpec(text=11, image=(4, 4)),
    SampleSpec(text=17),
    SampleSpec(text=5, video=(2, 4, 4)),
    SampleSpec(text=8, image=(2, 4)),
)


def _token_mean_loss(logits_BLV, labels_BL):
    """The causal LM loss in the logits' own dtype (transformers' loss upcasts to float32, which would make
    the float64 reference no better than the float32 yardstick)."""
    logits = logits_BLV[:, :-1].flatten(0, 1)
    labels = labels_BL[:, 1:].flatten()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / (labels != -100).sum()


def _loss_and_grads(model, batch):
    """Loss, the logits of the real tokens ``(T, V)`` in sample order, and every parameter gradient."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    loss = _token_mean_loss(logits, batch["labels"])
    loss.backward()
    mask = batch.get("attention_mask")
    real = logits[mask.bool()] if mask is not None and mask.ndim == 2 else logits.flatten(0, 1)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), real.detach(), grads


def _spec_rows(family: str) -> list[tuple[SampleSpec, ...]]:
    """SPECS as one row, or (a family whose images and videos cannot share a forward: GLM-4V) two rows, the
    image samples and the others, each with text only samples too."""
    if mixes_media(family):
        return [SPECS]
    return [tuple(s for s in SPECS if s.video is None), tuple(s for s in SPECS if s.image is None)]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("convention", ["upstream", "hf_positions"])
def test_packed_equals_padded(family, convention):
    if why := upstream_limit(family, "float64"):
        pytest.skip(f"no float64 oracle: {why}")
    for specs in _spec_rows(family):
        try:
            _check_packed_equals_padded(family, convention, specs)
        except UpstreamLimit as exc:
            pytest.skip(str(exc))


def _check_packed_equals_padded(family, convention, specs):
    if any(s.video for s in specs) and (why := upstream_limit(family, "videos")):
        raise UpstreamLimit(why)
    device, dtype = torch.device("cpu"), torch.float32
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(5)
    items = [_item(model, spec, gen) for spec in specs]
    row = PackedDataset(_ListDataset(items), budget=512)[0]  # the packer's order (longest first)
    padded = PaddedCollator(pad_token_id=0)(row)
    packed = PackedCollator(convention)(row)

    ref_model = copy.deepcopy(model).to(reference_dtype(device, dtype))
    if hasattr(ref_model, "set_experts_implementation"):
        ref_model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    ref_batch = {k: (v.double() if v.is_floating_point() else v) for k, v in padded.items()}
    ref_loss, ref_logits, ref_grads = _loss_and_grads(ref_model, ref_batch)
    pt_loss, pt_logits, pt_grads = _loss_and_grads(model, padded)
    with qwenvl.patch(model, backend="sdpa"):
        loss, logits, grads = _loss_and_grads(model, packed)

        # the model's own loss on the packed row (boundary labels masked) is the same token mean
        torch.testing.assert_close(model(**packed).loss, loss, rtol=2e-6, atol=0)

    tol = tolerance(device, dtype)
    verdict = judge(logits, ref_logits, pt_logits, k=tol.k_out)
    assert verdict.passed, f"logits: {verdict.err:.3e} > {verdict.bound:.3e} ({verdict.how})"
    # A scalar has no tail for the rule to measure (its floor is one rounding, by luck 0 to 1 ulp); the loss is
    # the mean cross-entropy of the logits judged above, so it is held to 1e-6 relative (8 float32 ulps).
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        verdict = judge(grads[name], ref, pt_grads[name], k=tol.k_grad)
        assert verdict.passed, f"{name}: {verdict.err:.3e} > {verdict.bound:.3e} ({verdict.how})"


class _ListDataset:
    def __init__(self, items):
        self.items = items
        self.lengths = [it["input_ids"].numel() for it in items]

    def __getitem__(self, i):
        return self.items[i]
