"""Video lengths from container headers (``qwenvl.data.video_lengths``) equal the fully processed sample's length,
on every family's real processor, with real mp4 files written by PyAV. Needs torchvision (transformers' video
processors) and PyAV; CPU CI has no torchvision, so these skip there."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torchvision", reason="transformers' video processors need torchvision")
pytest.importorskip("av", reason="the video rule reads container headers with PyAV, and the test writes mp4 with it")

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qwenvl.data import DataFileError, SupervisedDataset  # noqa: E402
from qwenvl.data.processor import load_processor  # noqa: E402
from qwenvl.data.video_lengths import probe_video_rule  # noqa: E402
from qwenvl.families import FAMILIES  # noqa: E402
from qwenvl.fixtures import model_dir, tiny_model  # noqa: E402
from videos import write_mp4  # noqa: E402

_LOADED: dict[str, tuple] = {}
# Where the probe declines the rule, as measured on 5.25.0: the Qwen3-Omni processor's _process_videos needs
# its audio options. A release without the processor helpers (4.57: no replace_video_token) falls back by design.
# Everywhere else a declined rule is a bug, never a skip (5.17's _merge_kwargs wanting its kwargs class was one).
_RULE_DECLINED = {"qwen3_omni_moe_thinker": "load_audio_from_video"}


def _load(family):
    if family not in _LOADED:
        _LOADED[family] = (load_processor(model_dir(family)), tiny_model(family))
    return _LOADED[family]


def _rule_or_skip(family):
    rule, why = probe_video_rule(_load(family)[0])
    if rule is None:
        known = _RULE_DECLINED.get(family)
        assert (known and known in why) or why.endswith("in this transformers release"), f"video rule declined: {why}"
        pytest.skip(f"every video row is processed here: {why}")
    return rule


_EVEN = st.integers(8, 320).map(lambda n: n - n % 2)  # yuv420p wants even sizes
_VIDEO = st.tuples(st.integers(1, 48), st.sampled_from([1, 2, 5, 12, 24, 30]), _EVEN, _EVEN)


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=5, deadline=None)
@given(videos=st.lists(_VIDEO, min_size=1, max_size=2), limit=st.sampled_from([64, 512, 100_000]))
@example(videos=[(1, 1, 8, 8)], limit=100_000)  # one frame: the temporal patch filled with repeats
@example(videos=[(48, 30, 320, 16)], limit=100_000)  # long at a high rate, thin
def test_video_lengths_from_headers_equal_processed_lengths(family, tmp_path_factory, videos, limit):
    """The dataset's lengths, cuts and refusals from container headers are those of processing each row in full
    (the decoded frames through the processor), and no frame is decoded to learn them."""
    import qwenvl.data.dataset as dataset_module

    _rule_or_skip(family)
    folder = tmp_path_factory.mktemp("videos")
    names = []
    for k, (frames, fps, height, width) in enumerate(videos):
        write_mp4(folder / f"{k}.mp4", frames, fps, height, width)
        names.append(f"{k}.mp4")
    tags = "".join("<video>" for _ in names)
    rows = [
        {
            "video": names,
            "conversations": [
                {"from": "human", "value": f"{tags}\nWhat moves?"},
                {"from": "gpt", "value": "A square."},
            ],
        },
        {
            "video": names[0],
            "conversations": [{"from": "human", "value": "<video>Go"}, {"from": "gpt", "value": "ok " * 30}],
        },
    ]
    (folder / "data.json").write_text(json.dumps(rows))
    processor, model = _load(family)

    def build(**kwargs):
        return SupervisedDataset(
            str(folder / "data.json"),
            processor,
            model=model,
            model_max_length=limit,
            skip_bad_samples=True,
            length_cache=False,
            **kwargs,
        )

    def no_decoding(ref, path):
        raise AssertionError(f"{path} decoded to learn its length")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(dataset_module, "load_video", no_decoding)
        try:
            header = build()
        except DataFileError as exc:  # every row refused: the same refusal either way
            with pytest.raises(DataFileError, match="every row"):
                build(header_lengths=False)
            assert "every row" in str(exc)
            return
    processed = build(header_lengths=False)
    assert header.lengths == processed.lengths
    assert header.truncated == processed.truncated
    assert header.skipped == processed.skipped
    for index in range(len(header)):
        assert header[index]["input_ids"].numel() == header.lengths[index]


def test_a_video_the_rule_cannot_count_is_processed_not_refused(tmp_path, monkeypatch):
    """Where the rule has no count for a video (5.17's helper counts no temporal patch for one frame: NoFrameCount
    from the rule itself), the row is processed in full as without the rule, never skipped as bad."""
    import qwenvl.data.video_lengths as video_lengths

    _rule_or_skip("qwen2_5_vl")
    write_mp4(tmp_path / "one.mp4", 1, 1, 64, 64)
    rows = [{"video": "one.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A square."}]}]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    processor, model = _load("qwen2_5_vl")

    def build(**kwargs):
        return SupervisedDataset(
            str(tmp_path / "data.json"), processor, model=model, model_max_length=100_000, skip_bad_samples=True,
            length_cache=False, **kwargs,
        )

    real = video_lengths.VideoRule.replacement

    def uncountable(self, metadata):  # the probe's videos still counted, so the rule is taken
        if metadata.total_num_frames == 1:
            raise video_lengths.NoFrameCount("1 frame(s): this release's get_num_of_video_patches counts no temporal patch")
        return real(self, metadata)

    monkeypatch.setattr(video_lengths.VideoRule, "replacement", uncountable)
    header = build()
    assert header._video_rule is not None and header.skipped == []
    assert header.lengths == build(header_lengths=False).lengths
