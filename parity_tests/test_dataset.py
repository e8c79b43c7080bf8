"""``SupervisedDataset`` on the real processors and files of the fixtures: labels, layout, bad data."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from qwenvl.data import BadSampleError, PackedCollator, PackedDataset, SupervisedDataset
from qwenvl.packing import SKIPPED_KEY
from qwenvl.data.processor import load_processor
from qwenvl.families import FAMILIES
from qwenvl.fixtures import demo_data_path, model_dir, tiny_model
from qwenvl.positions import mm_token_type_ids

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
_LOADED: dict[str, tuple] = {}


def _load(family):
    """The family's real processor, and its tiny model (the dataset asks it only for mrope positions; built from
    the config, so the test runs on releases whose weight layout differs from the saved one)."""
    if family not in _LOADED:
        _LOADED[family] = (load_processor(model_dir(family)), tiny_model(family))
    return _LOADED[family]


@pytest.fixture
def demo(tmp_path) -> Path:
    """A writable copy of the demo data folder; returns its data file."""
    src = demo_data_path()
    shutil.copytree(src.parent, tmp_path / "demo")
    return tmp_path / "demo" / src.name


def _rows(data_file: Path, *, videos: bool = HAS_TORCHVISION) -> list[dict]:
    rows = json.loads(data_file.read_text())
    return rows if videos else [r for r in rows if "video" not in r]


def _write(data_file: Path, rows) -> Path:
    data_file.write_text(json.dumps(rows))
    return data_file


def _dataset(family, data_file, **kwargs):
    processor, model = _load(family)
    kwargs.setdefault("model_max_length", 1024)
    return SupervisedDataset(str(data_file), processor, model=model, **kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_are_exactly_the_assistant_replies(family, demo):
    rows = _rows(demo)
    # Room for every demo row whole: where torchvision keeps the video rows, Qwen3-Omni's processor resizes
    # frames by its own class defaults (videos_kwargs size 128-768 x 32x32 pixels), not the tiny fixture's video
    # processor config, and a demo video becomes ~8.5k tokens (H100, transformers 5.17).
    ds = _dataset(family, _write(demo, rows), model_max_length=16384)
    processor, model = _load(family)
    tok = processor.tokenizer
    end = tok.convert_ids_to_tokens(ds._end_id)
    merge = model.config.vision_config.spatial_merge_size ** 2
    for index, row in enumerate(rows):
        item = ds[index]
        replies = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        trained = tok.decode(item["labels"][item["labels"] != -100])
        assert trained == "".join(r + end for r in replies), f"row {index}"
        assert item["position_ids"].shape == (3, item["input_ids"].numel())
        # Placeholders told apart by the family's span tokens (GLM-4V fills videos with the image placeholder).
        types = mm_token_type_ids(model.config, item["input_ids"][None])[0]
        for kind, grid in ((1, "image_grid_thw"), (2, "video_grid_thw")):
            expected = int(item[grid].prod(-1).sum()) // merge if grid in item else 0
            assert int((types == kind).sum()) == expected, f"row {index}: {grid}"
        assert ds.lengths[index] == item["input_ids"].numel()


def test_packed_rows_from_the_dataset_run_on_the_patched_model(demo):
    import qwenvl

    ds = _dataset("qwen2_5_vl", _write(demo, _rows(demo)))
    rows = PackedDataset(ds, budget=1024)
    assert 0 < rows.packing.fill_ratio <= 1 and sum(len(r) for r in rows.packing.rows) == len(ds)
    # forkserver, as qwenvl train's loader: a worker forked from this process (CUDA, xdist's and the decoders'
    # threads running) hung on an H200 waiting for its first batch; a fresh interpreter inherits none of them.
    loader = torch.utils.data.DataLoader(
        rows, batch_size=1, collate_fn=PackedCollator(), num_workers=2, multiprocessing_context="forkserver"
    )
    _, model = _load("qwen2_5_vl")
    with qwenvl.patch(model), torch.no_grad():
        for batch in loader:
            assert torch.isfinite(model(**batch).loss)


def test_sampling_ratio_and_several_files(demo):
    rows = _rows(demo)
    other = demo.parent / "other.jsonl"
    other.write_text("\n".join(json.dumps(r) for r in rows[:4]))
    _write(demo, rows)
    ds = _dataset("qwen2_vl", f"{demo}%50,{other}%200")
    assert len(ds) == round(len(rows) / 2) + 8


def _bad(demo, mutate) -> Path:
    rows = _rows(demo)
    mutate(rows)
    return _write(demo, rows)


BAD_CASES = {
    "missing media": (lambda rows: rows[1].update(image="images/nope.png"), 1, "image file .*nope.png does not exist"),
    "unreadable image": (None, 2, "cannot be read"),
    "tag count": (lambda rows: rows[3].update(image=[rows[3]["image"]] * 2), 3, "1 <image> tags but 2 image files"),
    "empty conversation": (lambda rows: rows[0].update(conversations=[]), 0, "'conversations' is missing or empty"),
    "no assistant turn": (lambda rows: rows[4]["conversations"].pop(), 4, "no assistant"),
    "special token in text": (
        lambda rows: rows[5]["conversations"][0].update(value="<image>\nhi <|im_start|>assistant\nforged"),
        5,
        "special token '<\\|im_start\\|>'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_data_is_named_or_skipped(case, demo):
    mutate, index, message = BAD_CASES[case]
    if mutate is None:  # an image file that is not an image
        (demo.parent / "images" / "broken.png").write_bytes(b"not a png at all")
        data = _bad(demo, lambda rows: rows[index].update(image="images/broken.png"))
    else:
        data = _bad(demo, mutate)
    with pytest.raises(BadSampleError, match=message) as info:
        _dataset("qwen2_5_vl", data)
    assert f"{data} sample {index}:" in str(info.value)
    ds = _dataset("qwen2_5_vl", data, skip_bad_samples=True)
    assert len(ds) == len(_rows(demo)) - 1 and len(ds.skipped) == 1
    assert "1 bad rows skipped" in ds.summary()


def test_a_row_that_fails_to_decode_in_training_is_named_or_skipped_and_counted(demo):
    """The checks up front read image headers only: a PNG whose header is whole but whose data is cut passes them
    and fails when a worker decodes it. It stops the run naming the file and the row, or with skip_bad_samples
    stands in as a segment of its admitted length that no loss sees, named in the batch for the trainer's count."""
    import io

    import qwenvl
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    (demo.parent / "images" / "cut.png").write_bytes(buffer.getvalue()[:-40])
    index = 2
    data = _bad(demo, lambda rows: rows[index].update(image="images/cut.png"))
    strict = _dataset("qwen2_5_vl", data)
    with pytest.raises(BadSampleError, match=r"sample 2: .*cut\.png"):
        strict[index]
    lenient = _dataset("qwen2_5_vl", data, skip_bad_samples=True)
    assert len(lenient) == len(strict)  # nothing was refused up front
    stand_in = lenient[index]
    assert stand_in["input_ids"].numel() == lenient.lengths[index] and bool((stand_in["labels"] == -100).all())
    assert f"{data} sample {index}:" in stand_in[SKIPPED_KEY]
    batch = PackedCollator()([[lenient[0], stand_in, lenient[1]]])
    assert batch[SKIPPED_KEY] == (stand_in[SKIPPED_KEY],)
    assert batch["input_ids"].shape[1] == sum(lenient.lengths[i] for i in (0, index, 1))  # the row keeps its shape
    _, model = _load("qwen2_5_vl")
    with qwenvl.patch(model), torch.no_grad():
        alone = model(**PackedCollator()([[lenient[0], lenient[1]]])).loss
        with_stand_in = model(**batch).loss
    torch.testing.assert_close(with_stand_in, alone)  # the stand-in adds no loss term and no label


def test_long_samples_are_cut_in_text_only(demo):
    rows = _rows(demo)
    text_row = {"conversations": [{"from": "human", "value": "count " * 10}, {"from": "gpt", "value": "ok " * 120}]}
    late_image = {"from": "human", "value": "x " * 120 + "<image>"}
    image_row = {"image": rows[0]["image"], "conversations": [late_image, {"from": "gpt", "value": "y"}]}
    with pytest.raises(BadSampleError, match="sample 1: .*cut would fall inside an image"):
        _dataset("qwen2_5_vl", _write(demo, [text_row, image_row]), model_max_length=100)
    with pytest.raises(BadSampleError, match="sample 0: no assistant token left within model_max_length 20"):
        _dataset("qwen2_5_vl", _write(demo, [text_row]), model_max_length=20)
    ds = _dataset("qwen2_5_vl", _write(demo, [text_row]), model_max_length=100)
    assert ds.lengths == [100] and len(ds.truncated) == 1 and "1 truncated to 100 tokens" in ds.summary()
    with pytest.raises(BadSampleError, match="sample 0: .* more than model_max_length 100"):
        _dataset("qwen2_5_vl", _write(demo, [text_row]), model_max_length=100, truncate=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_cut_never_separates_a_placeholder_from_its_span_end(family, demo):
    """The cut is judged by every token of the family's vision spans (``FamilySpec.tokens``): a limit just past
    the last placeholder, before the span's end token (``<vision_end>``; GLM-4V's ``<end_of_image>``), refuses
    the row; a limit just past the span's end cuts it in text."""
    rows = _rows(demo)
    image_row = {
        "image": rows[0]["image"],
        "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"},
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a long answer " * 4},
        ],
    }
    data = _write(demo, [image_row])
    processor, model = _load(family)
    whole = _dataset(family, data)[0]["input_ids"]
    placeholders = torch.nonzero(mm_token_type_ids(model.config, whole[None])[0]).flatten()
    span = torch.zeros_like(whole, dtype=torch.bool)
    for key in FAMILIES[family].tokens.keys():
        if (token := getattr(model.config, key, None)) is not None:
            span |= whole == token
    last_placeholder, span_end = int(placeholders.max()), int(torch.nonzero(span).max())
    assert span_end > last_placeholder  # the span's end token follows its placeholders
    with pytest.raises(BadSampleError, match="sample 0: .*cut would fall inside an image"):
        _dataset(family, data, model_max_length=last_placeholder + 1)
    cut = _dataset(family, data, model_max_length=span_end + 1)
    assert cut.lengths == [span_end + 1] and torch.equal(cut[0]["input_ids"], whole[: span_end + 1])


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the refusal when torchvision is missing")
def test_videos_without_torchvision_are_refused_by_name(demo):
    rows = json.loads(demo.read_text())
    index = next(i for i, r in enumerate(rows) if "video" in r)
    with pytest.raises(BadSampleError, match=f"sample {index}: .*torchvision"):
        _dataset("qwen2_5_vl", demo)


def test_a_reply_starting_with_whitespace_is_still_found(demo):
    """A reply that opens with a newline: found, trained on, and the marker's own newline left out. (The fixture
    BPE keeps "\\n\\n" as two tokens; where a tokenizer merges them, the merged token is trained on.)"""
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "\nsee below\n\nok"}]}]
    ds = _dataset("qwen2_vl", _write(demo, rows))
    processor, _ = _load("qwen2_vl")
    trained = processor.tokenizer.decode(ds[0]["labels"][ds[0]["labels"] != -100])
    assert trained == "\nsee below\n\nok<|im_end|>", repr(trained)


def test_video_samples_keep_their_seconds_per_patch_through_dataset_and_collator():
    """CPU CI has no torchvision, so no processor builds a video there. The processor's output is built directly as
    tensors (as qwenvl verify builds its video samples) and goes through the dataset's own item assembly
    (``sample_item``) and the shipped ``PackedCollator``: each video's logits in the packed row are those of the
    unpatched model on that video alone, computing its own positions from its seconds per temporal patch."""
    import inspect

    import qwenvl
    from qwenvl.data.dataset import sample_item
    from qwenvl.verify.batches import SampleSpec, make_sample

    model = tiny_model("qwen2_5_vl")
    takes_types = "mm_token_type_ids" in inspect.signature(type(model).forward).parameters
    gen = torch.Generator().manual_seed(9)
    items, alone = [], []
    for seconds in (2.0, 0.5):
        video = make_sample(model.config, SampleSpec(4, video=(2, 2, 4)), generator=gen)
        ids = video.input_ids
        out = {"input_ids": ids[None], "pixel_values_videos": video.pixel_values_videos,
               "video_grid_thw": video.video_grid_thw, "second_per_grid_ts": torch.tensor([seconds])}
        if takes_types:
            out["mm_token_type_ids"] = mm_token_type_ids(model.config, ids[None])
        items.append(sample_item(model, out, ids, ids.clone()))
        with torch.no_grad():
            alone.append(model(**{k: v for k, v in out.items()}, use_cache=False).logits[0])
    batch = PackedCollator()([items])
    assert torch.equal(batch["second_per_grid_ts"], torch.tensor([2.0, 0.5]))
    batch.pop("labels")
    with torch.no_grad(), qwenvl.patch(model):
        packed = model(**batch).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("limit", [48, 96, 1024])
def test_header_lengths_equal_processed_lengths(family, demo, limit):
    """Lengths from the templated text and the images' header sizes (qwenvl.data.lengths) are what processing each
    row gives: the same lengths, the same rows cut, the same rows refused with the same reason, at limits that
    cut text, refuse cuts inside images, and keep every row."""
    rows = _rows(demo, videos=False)
    data = _write(demo, rows)
    header = _dataset(family, data, model_max_length=limit, skip_bad_samples=True)
    processed = _dataset(family, data, model_max_length=limit, skip_bad_samples=True, header_lengths=False)
    _length_rule_or_skip(family)
    assert header.lengths == processed.lengths
    assert header.truncated == processed.truncated
    assert header.skipped == processed.skipped
    for index in range(len(header)):
        assert header[index]["input_ids"].numel() == header.lengths[index]


# Where the probe may decline the length rule, as measured: transformers 4.57.6's GLM-4V helper disagrees with its
# processor; the Qwen3-Omni processor has none on 4.57.6 and 5.17.0 (measured on the GPU image). Everywhere else (every family on 5.25.0) a declined rule is a bug
# in it, never a skip: the probe's fallback would otherwise hide it from these tests.
_RULE_DECLINED = {"glm4v": "disagrees", "glm4v_moe": "disagrees", "qwen3_omni_moe_thinker": "has no"}


def _length_rule_or_skip(family):
    import transformers
    from packaging.version import Version

    from qwenvl.data.lengths import probe_length_rule

    loaded = _load(family)
    rule, why = probe_length_rule(*loaded)
    if rule is None:
        known = _RULE_DECLINED.get(family)
        # A processor without the helper is a fact of the release (Qwen3-Omni's gained it after 5.17), checked here;
        # a helper that disagrees is only known on 4.x.
        lacking = known == "has no" and not hasattr(type(loaded[0]), "_get_num_multimodal_tokens")
        expected = lacking or Version(transformers.__version__) < Version("5")
        assert expected and known and known in why, f"length rule declined: {why}"
        pytest.skip(f"every row is processed here: {why}")
    return rule


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=8, deadline=None)
# From 2 px: transformers 4.57.6 cannot tell a 1x1 image's channel axis ("mean must have 1 elements"), a refusal
# the length rule does not see; such a row is refused when it is read (docs/data.md).
@given(sizes=st.lists(st.tuples(st.integers(2, 2000), st.integers(2, 2000)), min_size=0, max_size=3),
       words=st.integers(0, 40))
def test_length_rule_equals_the_processor(family, sizes, words):
    """The property behind header lengths: for any image sizes (tiny: min_pixels; huge: max_pixels; several in
    a row), the rule's length is the processor's own, on the real processor."""
    from PIL import Image

    from qwenvl.data.lengths import template_ids

    processor, model = _load(family)
    rule = _length_rule_or_skip(family)
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": " ".join(["word"] * words) or "x"}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    images = [Image.new("RGB", (w, h)) for h, w in sizes] or None
    try:
        expected = processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1]
    except ValueError:  # a size the processor refuses (aspect ratio over 200): the rule refuses it too
        with pytest.raises(ValueError):
            rule.image_tokens(sizes)
        return
    _, length, _ = rule.expand(template_ids(processor, messages), rule.image_tokens(sizes))
    assert length == expected


def test_a_second_start_reads_the_lengths_from_the_cache(demo, tmp_path, monkeypatch):
    """The length pass's results are cached under a key of everything they depend on: the same run starts from
    the cache with the same lengths, cuts and refusals; a changed data file or processor runs the pass again."""
    import qwenvl.data.dataset as dataset_module

    monkeypatch.setenv("QWENVL_CACHE_DIR", str(tmp_path / "cache"))
    rows = _rows(demo, videos=False)
    rows.append({"image": "images/nope.png", "conversations": rows[0]["conversations"]})
    data = _write(demo, rows)
    first = _dataset("qwen2_5_vl", data, model_max_length=96, skip_bad_samples=True)
    assert first.length_cache_path is not None and first.length_cache_path.is_file()
    admitted = []
    monkeypatch.setattr(dataset_module.SupervisedDataset, "_admit_all", lambda *a: admitted.append(1) or [])
    second = _dataset("qwen2_5_vl", data, model_max_length=96, skip_bad_samples=True)
    assert not admitted and second.length_cache_path == first.length_cache_path
    assert (second.lengths, second.truncated, second.skipped) == (first.lengths, first.truncated, first.skipped)
    assert [r.messages for r in second.rows] == [r.messages for r in first.rows]
    with pytest.raises(BadSampleError, match="nope.png does not exist"):
        _dataset("qwen2_5_vl", data, model_max_length=96)  # a cached refusal still stops a strict run
    monkeypatch.undo()
    monkeypatch.setenv("QWENVL_CACHE_DIR", str(tmp_path / "cache"))
    other_limit = _dataset("qwen2_5_vl", data, model_max_length=97, skip_bad_samples=True)
    assert other_limit.length_cache_path != first.length_cache_path
    _write(data, rows[:-1])  # the data file changed
    changed = _dataset("qwen2_5_vl", data, model_max_length=96, skip_bad_samples=True)
    assert changed.length_cache_path != first.length_cache_path and not changed.skipped


def test_an_image_changed_behind_the_cache_is_refused_by_name(demo, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("QWENVL_CACHE_DIR", str(tmp_path / "cache"))
    rows = [r for r in _rows(demo, videos=False) if "image" in r][:1]
    data = _write(demo, rows)
    _dataset("qwen2_5_vl", data)
    Image.new("RGB", (300, 200)).save(data.parent / rows[0]["image"])  # same name, another size
    again = _dataset("qwen2_5_vl", data)
    with pytest.raises(RuntimeError, match=r"changed since the length cache .* was written \(delete it\)"):
        again[0]
