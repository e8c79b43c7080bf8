"""Ordinary calls stay ordinary; the packed forms the patch adds are exact; its refusals say why.

An ordinary call (``generate``, a padded batch, positions that never restart inside a row) must give
bit-identical outputs patched and unpatched: the original code runs. transformers 5.x ``generate`` sends its
prefill with no mask and 4-row positions ``[text; t; h; w]``, which look like transformers' packed convention
until one checks that the text row never restarts inside a row.

``DataCollatorWithFlattening``'s ``(B, T)`` positions restarting at 0 are accepted for text-only batches
(every family, equal to each sample alone) and refused with vision inputs.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from hypothesis import example, given, reject, settings
from hypothesis import strategies as st

import qwenvl
from qwenvl.families import FAMILIES
from qwenvl.fixtures import tiny_model
from qwenvl.packing import VarlenMeta, cu_seqlens_to_position_ids, lengths_to_cu_seqlens
from qwenvl.patches._dispatch import packed_meta_from_inputs
from qwenvl.positions import mm_token_type_ids
from qwenvl.tolerances import tolerance
from qwenvl.verify.batches import SampleSpec, make_sample, sample_inputs
from tolerances import assert_close_by_rule

FAMILY_NAMES = tuple(FAMILIES)
# The tiny configs' special ids past the BPE (vision, GLM-4V's video wrapper, Qwen3-Omni's audio): a generated one
# would ask for pixels or audio.
SPECIAL_TOKENS = tuple(range(500, 512))


@pytest.fixture
def varlen_calls(monkeypatch) -> list:
    """The ``VarlenMeta`` of every call that reaches the varlen core (an ordinary call makes none)."""
    import qwenvl.patches._dispatch as dispatch

    calls = []
    real = dispatch.varlen_attention

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "varlen_attention", spy)
    return calls


def _takes_mm_token_type_ids(model) -> bool:
    return "mm_token_type_ids" in inspect.signature(type(model).forward).parameters  # transformers 5.3+


def _prompt(model, kind: str) -> dict:
    gen = torch.Generator().manual_seed(11)
    if kind == "text":
        return {"input_ids": torch.randint(3, 400, (2, 7), generator=gen)}
    sample = make_sample(model.config, SampleSpec(6, image=(2, 4)), generator=gen)
    inputs = {"input_ids": sample.input_ids[None], "pixel_values": sample.pixel_values, "image_grid_thw": sample.image_grid_thw}
    if _takes_mm_token_type_ids(model):
        inputs["mm_token_type_ids"] = mm_token_type_ids(model.config, inputs["input_ids"])
    return inputs


def _assert_identical(before, after, where: str = "output") -> None:
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and torch.equal(before, after), f"{where} differs"
    elif isinstance(before, (tuple, list)):
        assert isinstance(after, (tuple, list)) and len(before) == len(after), f"{where}: lengths differ"
        for i, (b, a) in enumerate(zip(before, after)):
            _assert_identical(b, a, f"{where}[{i}]")
    elif isinstance(before, dict):  # ModelOutput / GenerateOutput
        assert set(before.keys()) == set(after.keys()), f"{where}: fields differ"
        for key in before.keys():
            _assert_identical(before[key], after[key], f"{where}.{key}")


# (attn_implementation, prompt, generate kwargs): every mode that sends an ordinary prefill through the entry.
GENERATE_CASES = {
    "greedy-cache-attentions": ("eager", "text", {"output_attentions": True, "output_scores": True, "output_logits": True}),
    "greedy-no-cache-attentions": ("eager", "text", {"use_cache": False, "output_attentions": True, "output_scores": True}),
    "greedy-image": ("eager", "image", {"output_scores": True, "output_logits": True}),
    "greedy-image-no-cache": ("sdpa", "image", {"use_cache": False, "output_scores": True}),
    "beam-search": ("sdpa", "text", {"num_beams": 2, "output_scores": True}),
    "assisted": ("eager", "image", {"assistant_model": "self", "output_scores": True}),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generate_is_bit_identical_under_the_patch(family, case, varlen_calls):
    attn, prompt_kind, options = GENERATE_CASES[case]
    model = tiny_model(family, attn_implementation=attn)
    if "assistant_model" in options and getattr(model, "_is_stateful", False):
        pytest.skip(f"transformers refuses assisted generation for stateful (linear-attention) models such as {family}")
    inputs = _prompt(model, prompt_kind)
    options = {k: (model if v == "self" else v) for k, v in options.items()}
    kwargs = {
        "max_new_tokens": 3,
        "do_sample": False,
        "suppress_tokens": list(SPECIAL_TOKENS),
        "return_dict_in_generate": True,
        **options,
    }
    with torch.no_grad():
        before = model.generate(**inputs, **kwargs)
        with qwenvl.patch():
            after = model.generate(**inputs, **kwargs)
    if options.get("output_attentions"):
        assert before.attentions and before.attentions[0][0] is not None
    assert not varlen_calls, f"an ordinary generate took the varlen path ({len(varlen_calls)} attention calls)"
    _assert_identical(before, after)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generate_prefill_positions_with_output_attentions(family, varlen_calls):
    # generate's prefill on transformers 5.x, spelled out: no mask, 4-row positions counting up in every row.
    model = tiny_model(family, attn_implementation="eager")
    ids = torch.randint(3, 400, (2, 8))
    text = torch.arange(8).expand(2, 8)
    positions = torch.cat([text[None], text[None].expand(3, 2, 8)])
    if why := FAMILIES[family].release_bug("four_rows"):
        # The release fails this call unpatched (FamilySpec.release_bugs): patched, exactly the same way.
        with torch.no_grad(), pytest.raises(Exception) as unpatched:
            model(input_ids=ids, position_ids=positions, output_attentions=True, use_cache=False)
        with torch.no_grad(), qwenvl.patch(model), pytest.raises(unpatched.type, match=re.escape(str(unpatched.value))):
            model(input_ids=ids, position_ids=positions, output_attentions=True, use_cache=False)
        assert not varlen_calls, why
        return
    with torch.no_grad():
        before = model(input_ids=ids, position_ids=positions, output_attentions=True, use_cache=False)
        with qwenvl.patch(model):
            after = model(input_ids=ids, position_ids=positions, output_attentions=True, use_cache=False)
    assert not varlen_calls
    _assert_identical(before.logits, after.logits, "logits")
    _assert_identical(before.attentions, after.attentions, "attentions")


def test_positions_that_never_restart_inside_a_row_are_ordinary():
    ids = torch.zeros(2, 5, dtype=torch.long)
    counting = torch.arange(5).expand(2, 5)
    later = counting + 3  # a row need not start at 0 either
    for positions in (
        torch.cat([counting[None], counting[None].expand(3, 2, 5)]),
        torch.cat([later[None], counting[None].expand(3, 2, 5)]),
        counting,
        later[:1],
        counting[None].expand(3, 2, 5),
    ):
        kwargs = {"input_ids": ids, "position_ids": positions, "output_attentions": True}
        assert packed_meta_from_inputs(kwargs) is None
        assert kwargs["position_ids"] is positions and "attention_mask" not in kwargs
    restarting = torch.tensor([[0, 1, 2, 0, 1], [4, 5, 0, 1, 2]])
    meta = packed_meta_from_inputs({"input_ids": ids, "position_ids": torch.cat([restarting[None]] * 4)})
    assert isinstance(meta, VarlenMeta) and meta.offsets == (0, 3, 5, 7, 10)


# ---------------------------------------------------------------------------------------------------------
# (B, T) positions restarting inside a row: DataCollatorWithFlattening's text-only packing.


@st.composite
def flattened_rows(draw, *, max_rows: int = 2, max_len: int = 48):
    """Rows of equal length, each cut into samples at drawn points: ``[[len, ...], ...]``."""
    rows = draw(st.integers(1, max_rows))
    row_len = draw(st.integers(2, max_len))
    layout = []
    for _ in range(rows):
        cuts = draw(st.sets(st.integers(1, row_len - 1), max_size=5))
        bounds = [0, *sorted(cuts), row_len]
        layout.append([b - a for a, b in zip(bounds, bounds[1:])])
    return layout


def _weights(total: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(total, vocab, generator=gen, dtype=torch.float64) / total


def _alone(model, samples, weights):
    """Logits ``(T, V)`` and parameter gradients of each sample alone, unpatched (the model's own positions)."""
    model.zero_grad(set_to_none=True)
    logits, start = [], 0
    for sample in samples:
        out = model(**sample_inputs(model, sample), use_cache=False).logits[0]
        (out * weights[start : start + len(sample)].to(out.dtype)).sum().backward()
        logits.append(out.detach())
        start += len(sample)
    return torch.cat(logits), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILY_NAMES)
@settings(max_examples=4)
@given(layout=flattened_rows())
@example(layout=[[1, 1, 1, 1]])
@example(layout=[[5, 9, 2], [3, 13]])
def test_flattened_text_positions_equal_each_sample_alone(family, layout):
    if why := FAMILIES[family].release_bug("float64"):
        pytest.skip(f"no float64 oracle: {why}")
    if all(len(row) == 1 for row in layout) and FAMILIES[family].release_bug("unmasked"):
        reject()  # no row restarts: an ordinary unmasked call, which the release fails unpatched (release_bugs)
    model = tiny_model(family)
    ref_model = copy.deepcopy(model).double()
    if hasattr(ref_model, "set_experts_implementation"):
        ref_model.set_experts_implementation("eager")  # transformers 5.x grouped_mm has no float64 kernel
    gen = torch.Generator().manual_seed(len(layout))
    rows = [[make_sample(model.config, SampleSpec(n), generator=gen) for n in lengths] for lengths in layout]
    samples = [s for row in rows for s in row]
    input_ids = torch.stack([torch.cat([s.input_ids for s in row]) for row in rows])
    positions = torch.stack([cu_seqlens_to_position_ids(lengths_to_cu_seqlens(torch.tensor(n))) for n in layout])
    weights = _weights(input_ids.numel(), model.config.text_config.vocab_size)

    ref_logits, ref_grads = _alone(ref_model, samples, weights)
    pt_logits, pt_grads = _alone(model, samples, weights)
    model.zero_grad(set_to_none=True)
    with qwenvl.patch(model):
        out = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits.flatten(0, 1)
        (out * weights.float()).sum().backward()
    tol = tolerance("cpu", torch.float32)
    assert_close_by_rule(out, ref_logits, pt_logits, k=tol.k_out, name="logits", draw=layout)
    assert set(pt_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in pt_grads:
            assert_close_by_rule(p.grad, ref_grads[name], pt_grads[name], k=tol.k_grad, name=name, draw=layout,
                                 zero_atol=tol.zero_atol)
    assert (out.detach() - ref_logits).abs().max() < tol.model_atol


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_flattened_positions_with_vision_inputs_are_refused(family):
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(3)
    image = make_sample(model.config, SampleSpec(4, image=(2, 2)), generator=gen)
    text = make_sample(model.config, SampleSpec(5), generator=gen)
    ids = torch.cat([image.input_ids, text.input_ids])[None]
    positions = torch.cat([torch.arange(len(image)), torch.arange(len(text))])[None]
    inputs = {"input_ids": ids, "position_ids": positions, "pixel_values": image.pixel_values,
              "image_grid_thw": image.image_grid_thw}
    if _takes_mm_token_type_ids(model):
        inputs["mm_token_type_ids"] = mm_token_type_ids(model.config, ids)
    message = r"\(B, T\) restart at 0 inside a row.*pixel_values.*4-row position_ids.*attention_mask=cu_seqlens"
    with qwenvl.patch(model), pytest.raises(ValueError, match=message):
        model(**inputs)


# ---------------------------------------------------------------------------------------------------------
# The MoE router loss of an ordinary padded batch, and the refusals.


@settings(max_examples=6)
@given(
    pads=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
@example(pads=[(3, 0), (0, 2)], seed=0)
def test_moe_router_aux_loss_of_padded_batches_is_unchanged(pads, seed):
    row_len = 10
    pads = [(3, 0), *pads[1:]] if not any(left + right for left, right in pads) else pads  # always some padding
    model = tiny_model("qwen3_vl_moe")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 400, (len(pads), row_len), generator=gen)
    mask = torch.ones_like(ids)
    for row, (left, right) in enumerate(pads):
        mask[row, :left] = 0
        mask[row, row_len - right :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels, "output_router_logits": True}
    with torch.no_grad():
        before = model(**inputs)
        if getattr(before, "aux_loss", None) is None:
            pytest.skip("this transformers release computes no router aux loss")
        with qwenvl.patch(model):
            after = model(**inputs)
    assert torch.equal(before.aux_loss, after.aux_loss)
    assert torch.equal(before.loss, after.loss)


def _packed_inputs(total: int = 12) -> dict:
    return {
        "input_ids": torch.randint(3, 400, (1, total)),
        "position_ids": torch.arange(total).view(1, 1, total).expand(3, 1, total),
    }


@pytest.mark.parametrize(
    "cu_k",
    [torch.tensor([0, 6, 12], dtype=torch.int32), torch.tensor([0, 12], dtype=torch.int32)],
    ids=["other-values", "other-shape"],
)
def test_cu_seq_lens_k_other_than_q_is_refused(cu_k):
    model = tiny_model("qwen2_vl")
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    with qwenvl.patch(model), pytest.raises(ValueError, match=r"^cu_seq_lens_k must equal cu_seq_lens_q \(packed"):
        model(**_packed_inputs(), cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=7, max_length_k=7)


def test_cu_seq_lens_q_with_an_attention_mask_is_refused():
    model = tiny_model("qwen3_vl")
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with qwenvl.patch(model), pytest.raises(
        ValueError, match=r"^cu_seq_lens_q was given together with an attention_mask; pass one or the other$"
    ):
        model(**_packed_inputs(), attention_mask=torch.ones(1, 12, dtype=torch.long), cu_seq_lens_q=cu, cu_seq_lens_k=cu)


@pytest.mark.parametrize("convention", ["upstream", "hf_kwargs"])
def test_packed_batch_continuing_a_cache_is_refused(convention):
    model = tiny_model("qwen2_5_vl")
    cache_name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.no_grad():
        prefix = model(input_ids=torch.randint(3, 400, (1, 4)), use_cache=True)
    cache = getattr(prefix, cache_name)
    assert cache.get_seq_length() == 4
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    packed = {"attention_mask": cu} if convention == "upstream" else {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
    with qwenvl.patch(model), pytest.raises(ValueError, match=r"^a packed batch \(cu_seqlens\) cannot continue a non-empty cache$"):
        model(**_packed_inputs(), **packed, **{cache_name: cache})


def test_attention_interface_entry_is_restored_exactly():
    from transformers import AttentionInterface

    from qwenvl.patches import VARLEN_IMPLEMENTATION

    assert VARLEN_IMPLEMENTATION not in AttentionInterface()
    with qwenvl.patch():
        assert VARLEN_IMPLEMENTATION in AttentionInterface()
    assert VARLEN_IMPLEMENTATION not in AttentionInterface(), "an absent key must stay absent"

    def theirs(*args, **kwargs):
        raise AssertionError("never called")

    AttentionInterface.register(VARLEN_IMPLEMENTATION, theirs)
    try:
        with qwenvl.patch():
            assert AttentionInterface()[VARLEN_IMPLEMENTATION] is not theirs
        assert AttentionInterface()[VARLEN_IMPLEMENTATION] is theirs
    finally:
        del AttentionInterface._global_mapping[VARLEN_IMPLEMENTATION]
