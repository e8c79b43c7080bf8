"""The mutation catalogue (scripts/mutations.py) cannot rot: every planted bug still applies to the current source
(its text occurs exactly once and the mutated module still compiles), the catalogue covers the bugs it promises,
and the README's table lists exactly the catalogue. Seconds, no model runs.

Below those checks: the property tests added for mutations that once survived (a survivor is a hole in the suite,
closed by a test here, never by dropping the mutation).
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwenvl.fixtures import tiny_model
from qwenvl.positions import packed_position_ids, rope_index
from qwenvl.verify.batches import SampleSpec, make_sample

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = runpy.run_path(str(ROOT / "scripts" / "mutations.py"))
MUTATIONS = CATALOGUE["MUTATIONS"]

# What the catalogue promises to plant (issue 12), each by at least one mutation of that name.
PROMISED = (
    "cu_seqlens_off_by_one",
    "segment_merged_into_neighbour",
    "text_attention_non_causal",
    "vision_attention_causal",
    "softmax_scale_dropped_in_sdpa",
    "kv_heads_repeat_not_interleave",
    "sliding_window_off_by_one",
    "sliding_window_ignored",
    "max_seqlen_from_first_segment",
    "dropout_ignored_in_training",
    "vision_window_cu_seqlens_reused",
    "revert_misses_one_target",
    "padding_mask_treated_as_packed",
    "moe_router_loss_drops_padding_mask",
    "vision_lr_needs_projector_lr",
    "bias_gets_weight_decay",
    "projector_classed_as_vision",
    "labels_cross_sample_boundary",
    "collator_mrope_not_restarting",
    "packed_position_ids_not_restarting",
    "linear_conv_across_samples_torch",
    "linear_state_across_samples_torch",
    "linear_segments_whole_row",
)


def test_the_catalogue_is_complete_and_named_once():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)) >= 15
    assert not set(PROMISED) - set(names)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_every_mutation_still_applies(mutation):
    path = ROOT / mutation.file
    source = path.read_text()
    mutated = mutation.apply(source)  # raises unless each replaced text occurs exactly once
    assert mutated != source
    compile(mutated, str(path), "exec")
    for test in mutation.tests:
        file = test.split("::")[0]
        assert (ROOT / file).is_file(), f"{mutation.name}: no test file {file}"
        if "::" in test:
            name = re.sub(r"\[.*\]$", "", test.split("::")[1])
            assert f"def {name}(" in (ROOT / file).read_text(), f"{mutation.name}: no test {test}"


def test_the_readme_table_lists_the_catalogue():
    readme = (ROOT / "README.md").read_text()
    begin, end = CATALOGUE["README_BEGIN"], CATALOGUE["README_END"]
    assert begin in readme and end in readme, "run nox -s mutations to write the table"
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    listed = re.findall(r"^\| \d+ \| `([a-z0-9_]+)` \|", block, flags=re.M)
    assert listed == [m.name for m in MUTATIONS], "the README table is stale: run nox -s mutations"
    killed = re.search(r"\*\*killed (\d+) of (\d+)\*\*", block)
    assert killed and killed.group(1) == killed.group(2) == str(len(MUTATIONS))


# ---------------------------------------------------------------------------------------------------------
# Holes found by the catalogue.

_MODELS: dict[str, torch.nn.Module] = {}


def _model(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


@settings(max_examples=10)
@given(
    family=st.sampled_from(["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]),
    specs=st.lists(
        st.builds(
            SampleSpec,
            text=st.integers(1, 12),
            image=st.one_of(st.none(), st.just((2, 4))),
            video=st.one_of(st.none(), st.just((2, 2, 4))),
        ),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
@example(family="qwen2_5_vl", specs=[SampleSpec(text=3, image=(2, 4)), SampleSpec(text=5), SampleSpec(text=1)], seed=0)
def test_packed_position_ids_restart_at_every_sample(family, specs, seed):
    # Closes `packed_position_ids_not_restarting`: the public builder of upstream positions was only ever called
    # with one sample. Each sample's slice must be exactly what the model gives that sample alone (so every row
    # restarts at 0), whatever precedes it in the row.
    model = _model(family)
    gen = torch.Generator().manual_seed(seed)
    samples = [make_sample(model.config, spec, generator=gen) for spec in specs]
    packed = packed_position_ids(
        model,
        [s.input_ids for s in samples],
        image_grid_thw=[s.image_grid_thw for s in samples],
        video_grid_thw=[s.video_grid_thw for s in samples],
    )
    assert packed.shape == (3, 1, sum(len(s) for s in samples))
    start = 0
    for s in samples:
        alone = rope_index(model, s.input_ids[None], image_grid_thw=s.image_grid_thw, video_grid_thw=s.video_grid_thw)
        assert torch.equal(packed[:, :, start : start + len(s)], alone), "each sample keeps its own positions"
        assert packed[:, 0, start].tolist() == [0, 0, 0], "positions restart at every sample"
        start += len(s)
