"""The embedded default: each family's tiny model directory loads offline and works end to end.

For every family of ``FAMILIES``: the family's entry class (``AutoModelForImageTextToText`` has no Qwen3-Omni thinker
on 4.57), ``AutoTokenizer`` and ``AutoImageProcessor`` load ``fixtures/models/<fixture>/``; the processor turns demo rows into ``input_ids`` with exactly
``image_grid_thw.prod() / merge**2`` image pads per image; the model runs a forward (and a loss) on that output;
the stored weights give the logits recorded at generation time on this release too; the tokenizer round-trips
the demo text and its special tokens sit at the config's ids.

transformers' Qwen-VL processors cannot be built without torchvision on any supported release: the video
processor is a mandatory part and needs it (4.57: "AutoVideoProcessor requires the Torchvision library"; 5.x the
same for ``Qwen2VLVideoProcessor``, and passing ``video_processor=None`` fails in the base class check). PyPI's
torchvision wheels need a CUDA torch (``operator torchvision::nms does not exist`` beside the CPU wheel). Without
torchvision the image tests therefore run the family's own processor class with the video part left out
(``_ImagesOnly``: transformers' image-token expansion and chat-template code, unchanged); the video tests skip.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import qwenvl.fixtures as fixtures
from qwenvl.data.processor import load_processor
from qwenvl.families import FAMILIES
from qwenvl.fixtures import embedded
from qwenvl.positions import mm_token_type_ids

FAMILY_NAMES = list(FAMILIES)
PLACEHOLDER = re.compile(r"(<image>|<video>)")


def _torchvision_error() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # a CUDA wheel beside CPU torch raises RuntimeError, not ImportError
        return f"{type(error).__name__}: {error}"
    return None


TORCHVISION_ERROR = _torchvision_error()
needs_torchvision = pytest.mark.skipif(
    TORCHVISION_ERROR is not None,
    reason="transformers' Qwen-VL video processors need torchvision, which does not import here "
    f"({TORCHVISION_ERROR}); PyPI's torchvision wheels need a CUDA build of torch",
)


def _rows(kind: str) -> list[dict]:
    rows = json.loads(embedded.demo_data_path().read_text())
    if kind == "text":
        return [row for row in rows if "image" not in row and "video" not in row]
    if kind == "video":
        return [row for row in rows if "video" in row]
    wanted = {"image": str, "two images": list}[kind]
    return [row for row in rows if isinstance(row.get("image"), wanted)]


def _media(row: dict, key: str) -> list[str]:
    value = row.get(key, [])
    return [str(embedded.demo_dir() / path) for path in ([value] if isinstance(value, str) else value)]


def _messages(row: dict) -> list[dict]:
    """A demo row as chat messages: ``<image>`` / ``<video>`` placeholders become content parts, in order."""
    media = {"<image>": iter(_media(row, "image")), "<video>": iter(_media(row, "video"))}
    messages = []
    for turn in row["conversations"]:
        parts = []
        for piece in PLACEHOLDER.split(turn["value"]):
            if piece in media:
                parts.append({"type": piece[1:-1], "path": next(media[piece])})
            elif piece.strip("\n"):
                parts.append({"type": "text", "text": piece.strip("\n")})
        messages.append({"role": {"human": "user", "gpt": "assistant"}[turn["from"]], "content": parts})
    return messages


_PROCESSORS: dict[str, object] = {}


def _processor(family: str):
    """``AutoProcessor`` where torchvision imports; else the same class for images and text only."""
    if family not in _PROCESSORS:
        _PROCESSORS[family] = load_processor(embedded.model_dir(family))
    return _PROCESSORS[family]


_MODELS: dict[str, torch.nn.Module] = {}


def _unreadable_here(family: str) -> str | None:
    """Why this release cannot load the family's checkpoint (``None`` when it can)."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return None
    from safetensors import safe_open

    with safe_open(embedded.model_dir(family) / "model.safetensors", framework="pt") as weights:
        fused = [key for key in weights.keys() if key.endswith("mlp.experts.down_proj")]
    if fused:
        return (
            f"transformers {transformers.__version__} stores fused MoE experts transposed: the checkpoint, written "
            "in 5.x's layout (down_proj (E, H, I)), does not load here (use qwenvl.fixtures.tiny_model)"
        )
    return None


def _model_class(family: str):
    return getattr(transformers, FAMILIES[family].entry_classes[0])


def _model(family: str):
    """The family's tiny model loaded from its folder (cached; the tests only run it under no_grad or read it)."""
    reason = _unreadable_here(family)
    if reason:
        with pytest.raises(RuntimeError, match="size mismatch"):
            _model_class(family).from_pretrained(embedded.model_dir(family))
        pytest.xfail(reason)
    if family not in _MODELS:
        model = _model_class(family).from_pretrained(embedded.model_dir(family), attn_implementation="eager")
        _MODELS[family] = model.eval()
    return _MODELS[family]


def _model_inputs(model, batch) -> dict:
    """The processor's output as the model takes it (4.57's forward has no ``mm_token_type_ids``)."""
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k != "mm_token_type_ids" or k in accepted}


def _config(family: str) -> dict:
    return json.loads((embedded.model_dir(family) / "config.json").read_text())




@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_special_token_ids_equal_the_config(family):
    # Every id the config gives a vision-span role is a special token of the family's tokenizer (Qwen: <|image_pad|>
    # <|video_pad|> <|vision_start|> <|vision_end|>; GLM-4V: <|image|> <|begin_of_image|> <|end_of_image|>
    # <|begin_of_video|> <|end_of_video|>), never split by the BPE.
    config = _config(family)
    tokenizer = AutoTokenizer.from_pretrained(embedded.model_dir(family))
    added = tokenizer.get_added_vocab()
    for key, token_id in {**fixtures.token_ids(family), "video_token_id": config["video_token_id"]}.items():
        token = tokenizer.convert_ids_to_tokens(token_id)
        assert added.get(token) == token_id, f"{key} {token_id} is {token!r}, not an added token"
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id], key
    assert tokenizer.eos_token_id == config["text_config"]["eos_token_id"]
    assert tokenizer.pad_token_id == config["text_config"]["pad_token_id"]
    assert len(tokenizer) <= config["text_config"]["vocab_size"]


def test_tokenizer_round_trips_the_demo_text():
    tokenizer = AutoTokenizer.from_pretrained(embedded.tokenizer_dir())
    rows = json.loads(embedded.demo_data_path().read_text())
    texts = [turn["value"] for row in rows for turn in row["conversations"]]
    texts.append("Unseen: Zürich, 42 °C, naïve café — 東京!")
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    ids = tokenizer("What colour is the square?", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 8, f"a BPE trained on the demo text splits its own sentence into {len(ids)} ids"
    chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>"
    ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i < 3 or i >= 500] == [1, 502, 500, 503, 2]  # specials are never split


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_processor_finds_the_config_token_ids(family):
    # The processor looks its placeholders up by name (GLM-4V: <|image|>, <|video|>, <|begin_of_video|>; Qwen3-Omni:
    # the tokenizer's image_token / video_token attributes): the ids it finds are the config's.
    config = _config(family)
    processor = _processor(family)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(processor.image_token) == config["image_token_id"]
    assert tokenizer.convert_tokens_to_ids(processor.video_token) == config["video_token_id"]
    for attribute, key in (("video_start_id", "video_start_token_id"), ("video_end_id", "video_end_token_id")):
        if hasattr(processor, attribute):  # GLM-4V's processor from 5.x: video tokens are the ones inside these
            assert getattr(processor, attribute) == config[key]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_model_folder_has_the_shared_tokenizer(family):
    # Byte for byte, or (a family whose processor names its tokens otherwise) the same BPE with other special tokens.
    shared = json.loads((embedded.tokenizer_dir() / "tokenizer.json").read_text())
    own = json.loads((embedded.model_dir(family) / "tokenizer.json").read_text())
    if own == shared:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (embedded.model_dir(family) / name).read_bytes() == (embedded.tokenizer_dir() / name).read_bytes()
        return
    assert {k: v for k, v in own.items() if k != "added_tokens"} == {k: v for k, v in shared.items() if k != "added_tokens"}
    kept = {t["id"]: t for t in shared["added_tokens"] if t["id"] < 3 or not t["special"]}  # pad/bos/eos, <think>...
    assert {t["id"]: t for t in own["added_tokens"] if t["id"] in kept} == kept


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_tokenizer_round_trips_the_demo_text(family):
    # 5.x loads GLM-4V's folder with its own tokenizer class (TokenizersBackend): the same ids as the shared one.
    tokenizer = AutoTokenizer.from_pretrained(embedded.model_dir(family))
    shared = AutoTokenizer.from_pretrained(embedded.tokenizer_dir())
    rows = json.loads(embedded.demo_data_path().read_text())
    for text in [turn["value"] for row in rows[:6] for turn in row["conversations"]] + ["Zürich, 42 °C — 東京!"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == shared(text, add_special_tokens=False)["input_ids"] and tokenizer.decode(ids) == text




def test_demo_rows_are_well_formed():
    rows = json.loads(embedded.demo_data_path().read_text())
    kinds = {kind: len(_rows(kind)) for kind in ("image", "two images", "video", "text")}
    assert len(rows) == sum(kinds.values()) and all(kinds.values()), kinds
    assert any(len(row["conversations"]) > 2 for row in rows)
    for row in rows:
        roles = [turn["from"] for turn in row["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2) and roles
        text = "".join(turn["value"] for turn in row["conversations"])
        for key in ("image", "video"):
            paths = _media(row, key)
            assert text.count(f"<{key}>") == len(paths)
            assert all(embedded.demo_dir().joinpath(path).is_file() for path in paths)




@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_config_json_is_the_fixture_config(family):
    loaded = getattr(transformers, FAMILIES[family].config_class).from_pretrained(embedded.model_dir(family))
    expected = fixtures.tiny_config(family)
    assert type(loaded) is type(expected)
    for part in ("text_config", "vision_config"):
        assert getattr(loaded, part).to_dict() == getattr(expected, part).to_dict()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stored_weights_give_the_recorded_logits(family):
    """The checkpoint means the same model on this release as on the one that wrote it (Qwen3-VL-MoE's experts
    are stored transposed in 5.x's memory layout, and a square expert matrix would load wrong silently)."""
    model = _model(family)
    assert type(model).__name__ == FAMILIES[family].entry_classes[0]
    with torch.no_grad():
        logits = model(**_model_inputs(model, embedded.reference_input(model.config))).logits[0]
    expected = json.loads((embedded.model_dir(family) / "reference.json").read_text())
    torch.testing.assert_close(logits[-1, :8], torch.tensor(expected["last_logits_first_8"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[15, :8], torch.tensor(expected["image_logits_first_8"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kind", ["image", "two images", "text"])
def test_processor_output_runs_through_the_model(family, kind):
    processor = _processor(family)
    merge = processor.image_processor.merge_size
    model = _model(family)
    keys = FAMILIES[family].tokens
    start, end = getattr(model.config, keys.start), getattr(model.config, keys.end)
    for row in _rows(kind)[:3]:
        messages = _messages(row)
        batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        ids = batch["input_ids"]
        n_images = len(_media(row, "image"))
        assert int((ids == start).sum()) == int((ids == end).sum()) == n_images
        if n_images:
            grid = batch["image_grid_thw"]
            assert grid.shape == (n_images, 3)
            assert int((ids == model.config.image_token_id).sum()) == int(grid.prod(-1).sum()) // merge**2
            pads = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
            assert int(ids[0, pads[0] - 1]) == start and int(ids[0, pads[-1] + 1]) == end
            if "mm_token_type_ids" in batch:
                assert torch.equal(batch["mm_token_type_ids"] == 1, ids == model.config.image_token_id)
            from PIL import Image

            text = processor.apply_chat_template(messages, tokenize=False)
            images = [Image.open(path) for path in _media(row, "image")]
            direct = processor(text=[text], images=images, return_tensors="pt")
            assert torch.equal(direct["input_ids"], ids)
            assert torch.equal(direct["pixel_values"], batch["pixel_values"])
        else:
            assert int((ids == model.config.image_token_id).sum()) == 0
        inputs = _model_inputs(model, batch)
        with torch.no_grad():
            out = model(**inputs, labels=ids)
        assert out.logits.shape == (*ids.shape, model.config.text_config.vocab_size)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


def test_a_64x64_picture_is_a_handful_of_tokens():
    from PIL import Image

    for family in FAMILY_NAMES:
        image_processor = _processor(family).image_processor  # as training loads it (PIL where torchvision is absent)
        out = image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, 8, 8]], family  # 16 merged tokens


@needs_torchvision
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_video_rows_run_through_the_model(family):
    """Frames are decoded with PyAV here: 5.x's processors fetch video paths with torchcodec only."""
    pytest.importorskip("av", reason="decoding the demo mp4 files needs PyAV")
    from transformers.video_utils import load_video

    processor = _processor(family)
    merge = processor.video_processor.merge_size
    model = _model(family)
    spec = FAMILIES[family]
    video_id, start = getattr(model.config, spec.tokens.video), getattr(model.config, spec.tokens.start)
    for row in _rows("video"):
        (path,) = _media(row, "video")
        frames, metadata = load_video(path, backend="pyav")
        assert frames.shape == (8, 32, 32, 3) and metadata.fps == 4
        text = processor.apply_chat_template(_messages(row), tokenize=False)
        batch = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt")
        ids, grid = batch["input_ids"], batch["video_grid_thw"]
        video_BL = mm_token_type_ids(model.config, ids) == 2  # GLM-4V: image placeholders inside the video wrapper
        assert int(video_BL.sum()) == int((ids == video_id).sum()) == int(grid.prod(-1).sum()) // merge**2
        # Spans opened right before video pads. 5.x's Qwen3-VL processor replaces only the pad inside the template's
        # <|vision_start|><|video_pad|><|vision_end|>, so one more (outer) pair surrounds the timestamped groups
        # there; 4.57 replaced the whole triple. Counting only the spans that hold pads holds on both.
        opens = (ids[:, :-1] == start) & (ids[:, 1:] == video_id)
        assert int(opens.sum()) == (int(grid[:, 0].sum()) if spec.video_group_spans else len(grid))
        if "mm_token_type_ids" in batch:
            assert torch.equal(batch["mm_token_type_ids"] == 2, video_BL)
        with torch.no_grad():
            out = model(**_model_inputs(model, batch), labels=ids)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
