"""Build the embedded default fixtures: a demo dataset, a real tokenizer, and a tiny model of every family.

    python scripts/make_fixtures.py            # (re)write fixtures/demo, fixtures/tokenizer, fixtures/models
    python scripts/make_fixtures.py --check    # rebuild in a temporary folder and fail if anything differs

Deterministic (seed 0, fixed drawing and encoding settings) and idempotent: a file is rewritten only when its
bytes change, and a second run reports "0 written". Nothing is downloaded. What it writes:

    fixtures/demo/data.json         24 rows of the Qwen-VL fine-tuning format (single- and two-image rows,
                                    multi-turn rows, text-only rows, video rows)
    fixtures/demo/images/*.png      64x64 (and 64x48) coloured shapes, drawn with Pillow
    fixtures/demo/videos/*.mp4      8 frames 32x32 at 4 fps of a moving square, written with PyAV (mpeg4)
    fixtures/tokenizer/             byte-level BPE trained on the demo text (500 ids) + Qwen special tokens
    fixtures/models/<fixture>/      config.json, model.safetensors (random init, seed 0, float32), the
                                    processor files (image and video processor configs, chat template) and
                                    the tokenizer files; loadable by the family's entry class and AutoProcessor
                                    offline. reference.json holds a few logits of a fixed input, so a test can
                                    prove another transformers release reads the weights alike.

Token ids (the special ids must equal the configs' ``*_token_id`` fields; the tests check):

    0 <|endoftext|> (pad)   1 <|im_start|>   2 <|im_end|> (eos)   3..258 the 256 bytes   259..499 merges
    500 <|image_pad|>   501 <|video_pad|>   502 <|vision_start|>   503 <|vision_end|>   504.. the rest

Each family's processor files follow its ``ProcessorRecipe`` (``PROCESSORS``, by family name; Qwen3-VL's by
default). A family whose processor looks its tokens up by other names has its own tokenizer files, the same BPE with
other special tokens (the recipe names one of ``TOKENIZER_VARIANTS``): GLM-4V names 500..503 <|image|> <|video|> <|begin_of_image|>
<|end_of_image|> and adds 509 <|begin_of_video|>, 510 <|end_of_video|>; Qwen3-Omni adds 509 <|audio_pad|>,
510 <|audio_start|>, 511 <|audio_end|> and names them all as tokenizer attributes (its processor reads
``tokenizer.image_token``, ``tokenizer.vision_bos_token``, ...).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import io
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SEED = 0

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
BACKGROUND = (250, 250, 250)

# (file stem, colour, shape, size (width, height))
IMAGES = [
    ("red_square", "red", "square", (64, 64)),
    ("green_circle", "green", "circle", (64, 64)),
    ("blue_triangle", "blue", "triangle", (64, 64)),
    ("yellow_square", "yellow", "square", (64, 64)),
    ("purple_circle", "purple", "circle", (64, 64)),
    ("orange_triangle", "orange", "triangle", (64, 64)),
    ("blue_square", "blue", "square", (64, 64)),
    ("red_circle", "red", "circle", (64, 64)),
    ("green_triangle", "green", "triangle", (64, 48)),
    ("orange_square", "orange", "square", (64, 48)),
]

# (file stem, colour, direction, (dx, dy) per frame in pixels)
VIDEOS = [
    ("red_right", "red", "from left to right", (3, 0)),
    ("blue_down", "blue", "from top to bottom", (0, 3)),
    ("green_diagonal", "green", "from the top left corner to the bottom right corner", (3, 3)),
]
VIDEO_FRAMES, VIDEO_SIZE, VIDEO_FPS = 8, 32, 4


def draw_shape(colour: str, shape: str, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    side = min(width, height) * 5 // 8
    x0, y0 = (width - side) // 2, (height - side) // 2
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    else:
        raise ValueError(shape)
    return image


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def video_frames(colour: str, step: tuple[int, int]):
    """``VIDEO_FRAMES`` RGB uint8 arrays ``(VIDEO_SIZE, VIDEO_SIZE, 3)``: an 8x8 square moving by ``step``."""
    import numpy as np

    frames = []
    for i in range(VIDEO_FRAMES):
        frame = np.full((VIDEO_SIZE, VIDEO_SIZE, 3), BACKGROUND, dtype=np.uint8)
        x, y = 2 + step[0] * i, 2 + step[1] * i
        frame[y : y + 8, x : x + 8] = COLOURS[colour]
        frames.append(frame)
    return frames


def mp4_bytes(frames) -> bytes:
    """MPEG-4 part 2 in an mp4 container: the encoder is part of every FFmpeg build (PyAV's wheels have no x264
    guarantee), single-threaded and without the muxer's encoder tag, so the bytes are reproducible."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 200_000
        stream.thread_count = 1
        stream.codec_context.flags |= int(av.codec.context.Flags.bitexact)
        stream.time_base = Fraction(1, VIDEO_FPS)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def demo_rows() -> list[dict]:
    """26 rows: 16 single-image (3 of three turns), 3 two-image and 3 video (two turns each), 4 text-only (one of
    two turns). Every answer is a fact of the drawing; ``<image>`` may stand inside the question."""
    rows = []
    by_stem = {stem: (colour, shape) for stem, colour, shape, _ in IMAGES}
    questions = [
        ("What colour is the {shape}?", "The {shape} is {colour}."),
        ("What shape is in the picture?", "It is a {colour} {shape}."),
        ("Describe the picture.", "A {colour} {shape} on a white background."),
    ]
    for i, (stem, (colour, shape)) in enumerate(by_stem.items()):
        question, answer = questions[i % len(questions)]
        rows.append(
            {
                "image": f"images/{stem}.png",
                "conversations": turn(
                    "<image>\n" + question.format(shape=shape), answer.format(colour=colour, shape=shape)
                ),
            }
        )
    for stem in ("purple_circle", "blue_triangle", "orange_square"):
        colour, shape = by_stem[stem]
        rows.append(
            {
                "image": f"images/{stem}.png",
                "conversations": turn("<image>\nWhat shape is this?", f"A {shape}.")
                + turn("And what colour is it?", f"It is {colour}.")
                + turn("Is it drawn on a dark background?", "No, the background is white."),
            }
        )
    pairs = (("red_square", "green_circle"), ("blue_square", "yellow_square"), ("red_circle", "red_square"))
    for first, second in pairs:
        (c1, s1), (c2, s2) = by_stem[first], by_stem[second]
        same_shape = "Yes, both show a " + s1 if s1 == s2 else f"No. The first shows a {s1} and the second a {s2}"
        same_colour = "Yes, both are " + c1 if c1 == c2 else f"No. The first is {c1} and the second is {c2}"
        rows.append(
            {
                "image": [f"images/{first}.png", f"images/{second}.png"],
                "conversations": turn("<image>\n<image>\nDo the two pictures show the same shape?", same_shape + ".")
                + turn("Do they have the same colour?", same_colour + "."),
            }
        )
    for stem, colour, direction, _ in VIDEOS:
        motion = f"The {colour} square moves {direction}."
        rows.append(
            {
                "video": f"videos/{stem}.mp4",
                "conversations": turn("<video>\nWhich way does the square move?", motion)
                + turn("What colour is the moving square?", f"It is {colour}."),
            }
        )
    rows += [
        {"conversations": turn("What colour do you get when you mix red and yellow?", "You get orange.")},
        {"conversations": turn("How many sides does a triangle have?", "A triangle has three sides.")},
        {
            "conversations": turn("Name a shape with four equal sides.", "A square has four equal sides.")
            + turn("And one with no corners?", "A circle has no corners.")
        },
        {"conversations": turn("Is blue a warm or a cool colour?", "Blue is a cool colour.")},
    ]
    for stem, question, answer in (
        ("green_circle", "<image>\nIs the circle red?", "No, the circle is green."),
        ("yellow_square", "Look at this picture.\n<image>\nHow many corners has the shape?", "The square has four."),
        ("orange_triangle", "<image>\nWhat is drawn here, and in which colour?", "An orange triangle."),
    ):
        rows.append({"image": f"images/{stem}.png", "conversations": turn(question, answer)})
    return rows


BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad, (bos), eos of the configs
TRAINED_VOCAB = 500  # BASE_SPECIALS + 256 bytes + 241 merges
# In the configs' order from id 500: image, video, vision start, vision end; then what the templates use.
LATE_SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
LATE_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]  # added, not special (as in Qwen3)
VOCAB_SIZE = 512

# The tokenizers a family's processor may need instead of the shared one, by the name its ``ProcessorRecipe`` gives:
# (the specials at 500..504, the specials added after LATE_TOKENS from 509 on, tokenizer attributes naming tokens).
GLM_SPECIALS = ["<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|vision_pad|>"]
GLM_TOKENIZER = (GLM_SPECIALS, ["<|begin_of_video|>", "<|end_of_video|>"], {})
OMNI_TOKENIZER = (
    LATE_SPECIALS,
    ["<|audio_pad|>", "<|audio_start|>", "<|audio_end|>"],
    {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "audio_token": "<|audio_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
    },
)
TOKENIZER_VARIANTS = {"glm": GLM_TOKENIZER, "omni": OMNI_TOKENIZER}

# Qwen2's pre-tokenizer: transformers 5.x rebuilds exactly this pipeline around the vocab and merges of
# tokenizer.json (``Qwen2Tokenizer.__init__``); 4.x reads tokenizer.json as it is. Both must agree.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

EXTRA_TEXT = """\
You are a helpful assistant.
system
user
assistant
Picture 1: Picture 2: Video 1: seconds
The pictures in this demo show simple shapes: a square, a circle or a triangle, drawn in one colour on a white
background. The colours are red, green, blue, yellow, purple and orange. A square has four equal sides and four
corners, a triangle has three sides and three corners, and a circle has no corners at all. In the videos a small
square moves across the frame, from left to right, from top to bottom, or along the diagonal.
Mixing colours: red and yellow give orange, blue and yellow give green, red and blue give purple.
Warm colours are red, orange and yellow; cool colours are green, blue and purple.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 one two three four five six seven eight.
Questions and answers: What is this? Which one? How many? Is it the same? Yes. No. The first and the second.
"""


def corpus(rows: list[dict]) -> list[str]:
    lines = [EXTRA_TEXT]
    for row in rows:
        lines += [message["value"] for message in row["conversations"]]
    return lines


def train_tokenizer(rows: list[dict], late_specials: list[str] = LATE_SPECIALS, extra_specials: list[str] = ()):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(rows), trainer=trainer)
    if tokenizer.get_vocab_size() != TRAINED_VOCAB:
        raise RuntimeError(f"BPE reached {tokenizer.get_vocab_size()} ids, not {TRAINED_VOCAB}: add demo text")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in late_specials])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in LATE_TOKENS])
    if extra_specials:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_specials])
    if tokenizer.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"{tokenizer.get_vocab_size()} ids do not fit the configs' vocab of {VOCAB_SIZE}")
    return tokenizer


def tokenizer_files(
    tokenizer, late_specials: list[str] = LATE_SPECIALS, extra_specials: list[str] = (), attributes: dict | None = None
) -> dict[str, bytes]:
    """tokenizer.json and a tokenizer_config.json shaped like the real Qwen2-VL one (read by 4.57 and 5.x);
    ``attributes`` name tokens for a processor (``extra_special_tokens``: ``tokenizer.image_token`` ...)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    decoder = {}
    for token in BASE_SPECIALS + late_specials + LATE_TOKENS + list(extra_specials):
        decoder[str(vocab[token])] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token not in LATE_TOKENS,
        }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": BASE_SPECIALS[1:] + late_specials + list(extra_specials),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if attributes:
        config["extra_special_tokens"] = attributes
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode() + b"\n",
        "tokenizer_config.json": dumps(config),
    }


# Chat templates: written for these fixtures after the shape of the released Qwen-VL templates (ChatML turns,
# one <|vision_start|><|image_pad|><|vision_end|> per image, optional "Picture N: " labels).

_CONTENT_TEMPLATE = """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}
                {%- set counts.image = counts.image + 1 -%}
                {%- if add_vision_id -%}{{- 'Picture ' ~ counts.image ~ ': ' -}}{%- endif -%}
                {{- 'IMAGE_SPAN' -}}
            {%- elif part.type == 'video' or 'video' in part -%}
                {%- set counts.video = counts.video + 1 -%}
                {%- if add_vision_id -%}{{- 'Video ' ~ counts.video ~ ': ' -}}{%- endif -%}
                {{- 'VIDEO_SPAN' -}}
            {%- elif 'text' in part -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
"""


def _content(image_span: str, video_span: str) -> str:
    return _CONTENT_TEMPLATE.replace("IMAGE_SPAN", image_span).replace("VIDEO_SPAN", video_span)


_CONTENT = _content("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>")

# Qwen2-VL and Qwen2.5-VL: a default system prompt when the conversation has none.
QWEN2_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}\n"
    + _CONTENT
    + """\
{%- for message in messages -%}
    {%- if loop.first and message.role != 'system' -%}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' ~ message.role ~ '\\n' -}}
    {{- render_content(message.content) -}}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""
)

# Qwen3-VL: no default system prompt; assistant reasoning inside <think>, tool calls as JSON in <tool_call>,
# tool results as a user turn of <tool_response> blocks. Videos keep the <|vision_start|>...<|vision_end|> wrapper of
# the released template: 4.57's processor replaces the whole triple with timestamped groups, 5.x only the pad (so an
# outer pair remains around the groups there, as with the released template).
QWEN3_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}\n"
    + _CONTENT
    + """\
{%- for message in messages -%}
    {%- if message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\\n<tool_response>\\n' -}}
        {{- render_content(message.content) -}}
        {{- '\\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' ~ message.role ~ '\\n' -}}
        {%- if message.role == 'assistant' and message.reasoning_content -%}
            {{- '<think>\\n' ~ message.reasoning_content.strip() ~ '\\n</think>\\n\\n' -}}
        {%- endif -%}
        {{- render_content(message.content) -}}
        {%- if message.role == 'assistant' and message.tool_calls -%}
            {%- for call in message.tool_calls -%}
                {%- set call = call.function if call.function else call -%}
                {%- if message.content or not loop.first -%}{{- '\\n' -}}{%- endif -%}
                {{- '<tool_call>\\n{"name": "' ~ call.name ~ '", "arguments": ' -}}
                {{- call.arguments if call.arguments is string else call.arguments | tojson -}}
                {{- '}\\n</tool_call>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""
)

# GLM-4V's spans (its processor expands the video placeholder into timestamped <|begin_of_image|> ... <|end_of_image|>
# frames), in the Qwen3 turns: these fixtures share the Qwen tokenizer's role markers.
GLM_TEMPLATE = QWEN3_TEMPLATE.replace(
    _CONTENT, _content("<|begin_of_image|><|image|><|end_of_image|>", "<|begin_of_video|><|video|><|end_of_video|>")
)

# Processor configs. Tiny vision sizes: patch 4, temporal patch 2, merge 2 (a factor of 8 pixels per merged token).
# Images are resized to between 16x16 and 32x32 pixels' area: a 64x64 picture gives 8x8 patches, 16 tokens.
# Video frames go to 16x16: 4 tokens per temporal pair of frames.

PATCH, TEMPORAL_PATCH, MERGE = 4, 2, 2
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 16 * 16, 32 * 32
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 8 * 8, 16 * 16
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]

# Qwen3-Omni's processor also holds an audio feature extractor (Whisper's log-mel), configured in the same
# preprocessor_config.json as the image processor; its mel bins are the tiny audio tower's.
WHISPER_FEATURES = {
    "chunk_length": 300,
    "dither": 0.0,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 16000,
}


def _qwen_image(common: dict) -> dict:
    return {
        **common,
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": IMAGE_MIN_PIXELS,
        "max_pixels": IMAGE_MAX_PIXELS,
        "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
    }


def _qwen2_processors(common: dict, video_type: str) -> tuple[dict, dict]:
    """Qwen2-VL's image and video processors: each frame's pixels bounded alike."""
    video = {
        **common,
        "video_processor_type": video_type,
        "min_pixels": VIDEO_MIN_PIXELS,
        "max_pixels": VIDEO_MAX_PIXELS,
        "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
    }
    return _qwen_image(common), video


def _qwen3_processors(common: dict, video_type: str) -> tuple[dict, dict]:
    """Qwen3-VL bounds the pixels of the whole clip (frames x height x width) and samples frames at ``fps``:
    8 frames at 4 fps become 4 frames, 4 x 16 x 16 pixels, 2 temporal groups of 4 tokens."""
    video = {
        **common,
        "video_processor_type": video_type,
        "size": {"shortest_edge": 4 * VIDEO_MIN_PIXELS, "longest_edge": 4 * VIDEO_MAX_PIXELS},
        "do_sample_frames": True,
        "fps": 2,
        "min_frames": 2,
        "max_frames": 16,
    }
    return _qwen_image(common), video


def _glm_processors(common: dict, video_type: str) -> tuple[dict, dict]:
    """GLM-4V's own image and video processors bound the pixels of temporal_patch_size frames (an image counts
    twice): the same 16x16..32x32 pixels per frame as the Qwen ones, 8 frames at 4 fps sampled at 2 fps."""
    image = {
        **common,
        "image_processor_type": "Glm4vImageProcessor",
        "size": {"shortest_edge": TEMPORAL_PATCH * IMAGE_MIN_PIXELS, "longest_edge": TEMPORAL_PATCH * IMAGE_MAX_PIXELS},
    }
    video = {
        **common,
        "video_processor_type": video_type,
        "size": {"shortest_edge": 4 * VIDEO_MIN_PIXELS, "longest_edge": 4 * VIDEO_MAX_PIXELS},
        "max_image_size": {"longest_edge": 4 * VIDEO_MAX_PIXELS},
        "do_sample_frames": True,
        "fps": 2,
        "max_duration": 300,
    }
    return image, video


@dataclass(frozen=True)
class ProcessorRecipe:
    """How a family's fixture processor files are written (fixture facts: the real checkpoints' normalisation, a
    template written for these fixtures).

    processor_class: the processor ``AutoProcessor`` builds; mean, std: the image normalisation; template: the chat
    template; video_processor: the video processor type; processors: builds the image and the video processor
    configs from the keys they share and ``video_processor``; tokenizer: a ``TOKENIZER_VARIANTS`` name where the
    processor looks its tokens up by other names than the shared tokenizer's, else ``None``.
    """

    processor_class: str
    mean: list[float]
    std: list[float]
    template: str
    video_processor: str
    processors: Callable[[dict, str], tuple[dict, dict]]
    tokenizer: str | None = None


QWEN2_VL_RECIPE = ProcessorRecipe(
    "Qwen2VLProcessor", CLIP_MEAN, CLIP_STD, QWEN2_TEMPLATE, "Qwen2VLVideoProcessor", _qwen2_processors
)
QWEN3_VL_RECIPE = ProcessorRecipe("Qwen3VLProcessor", HALF, HALF, QWEN3_TEMPLATE, "Qwen3VLVideoProcessor", _qwen3_processors)
GLM4V_RECIPE = ProcessorRecipe(
    "Glm4vProcessor", CLIP_MEAN, CLIP_STD, GLM_TEMPLATE, "Glm4vVideoProcessor", _glm_processors, tokenizer="glm"
)

# By family name (``FamilySpec.name``): the recipe of each family whose processor is not Qwen3-VL's. Every other
# family (today Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE) takes ``DEFAULT_RECIPE``, so a new family that shares
# Qwen3-VL's processor needs no entry here.
DEFAULT_RECIPE = QWEN3_VL_RECIPE
PROCESSORS: dict[str, ProcessorRecipe] = {
    "qwen2_vl": QWEN2_VL_RECIPE,
    "qwen2_5_vl": replace(QWEN2_VL_RECIPE, processor_class="Qwen2_5_VLProcessor"),
    "glm4v": GLM4V_RECIPE,
    "glm4v_moe": GLM4V_RECIPE,
    "qwen3_omni_moe_thinker": ProcessorRecipe(
        "Qwen3OmniMoeProcessor", HALF, HALF, QWEN3_TEMPLATE, "Qwen2VLVideoProcessor", _qwen2_processors, tokenizer="omni"
    ),
}


def recipe(spec) -> ProcessorRecipe:
    """The processor recipe of a family (``FamilySpec``): its own, or ``DEFAULT_RECIPE``."""
    return PROCESSORS.get(spec.name, DEFAULT_RECIPE)


def processor_files(recipe: ProcessorRecipe, audio_config: dict | None = None) -> dict[str, bytes]:
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": recipe.mean,
        "image_std": recipe.std,
        "merge_size": MERGE,
        "patch_size": PATCH,
        "processor_class": recipe.processor_class,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "temporal_patch_size": TEMPORAL_PATCH,
    }
    image, video = recipe.processors(common, recipe.video_processor)
    if audio_config is not None:
        image = {**image, **WHISPER_FEATURES, "feature_size": audio_config["num_mel_bins"]}
    return {
        "preprocessor_config.json": dumps(image),
        "video_preprocessor_config.json": dumps(video),
        "chat_template.jinja": recipe.template.encode(),
    }



def model_config(spec) -> dict:
    """config.json: the fixture config as ``qwenvl.fixtures.tiny_config`` reads it, plus what from_pretrained needs."""
    data = json.loads((FIXTURES / "configs" / f"{spec.fixture}.json").read_text())
    return {"architectures": [spec.entry_classes[0]], "model_type": spec.name, "dtype": "float32", **data}


def reference_logits(model, config) -> dict:
    import torch

    from qwenvl.fixtures.embedded import reference_input

    inputs = reference_input(config, seed=SEED)
    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        del inputs["mm_token_type_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    return {
        "input": "qwenvl.fixtures.embedded.reference_input(config, seed=0)",
        "last_logits_first_8": [round(float(x), 6) for x in logits[-1, :8]],
        "image_logits_first_8": [round(float(x), 6) for x in logits[15, :8]],  # an image token's row
        "logits_abs_mean": round(float(logits.abs().mean()), 6),
    }


def model_files(spec) -> dict[str, bytes]:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    data = model_config(spec)
    # A deep copy: config classes rewrite the rope dict they are given in place (5.x adds rope_theta to it).
    config = spec.config_type().from_dict(copy.deepcopy(data))
    torch.manual_seed(SEED)
    model = spec.entry_type()._from_config(config, attn_implementation="eager")
    model = model.to(torch.float32).eval()
    # The checkpoint is in the generating release's layout. For Qwen3-VL-MoE that matters: 5.x keeps fused experts
    # as gate_up (E, 2I, H) / down (E, H, I), 4.x as (E, H, 2I) / (E, I, H), and 5.x's save_pretrained does not
    # transpose back (its shape-checked Transpose sees the model's own shape). Generate with 5.x: 5.0 and later read
    # it; 4.57 refuses it with a shape error (tested). When 2I == H the layouts cannot be told apart by shape.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        weights = (Path(tmp) / "model.safetensors").read_bytes()
    return {
        "config.json": dumps(data),
        "model.safetensors": weights,
        "reference.json": dumps(reference_logits(model, config)),
    }




def dumps(data) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def build() -> dict[str, bytes]:
    """Every fixture file, as ``{path relative to fixtures/: bytes}``."""
    import torch

    from qwenvl.families import FAMILIES

    torch.manual_seed(SEED)
    files: dict[str, bytes] = {}
    for stem, colour, shape, size in IMAGES:
        files[f"demo/images/{stem}.png"] = png_bytes(draw_shape(colour, shape, size))
    for stem, colour, _, step in VIDEOS:
        files[f"demo/videos/{stem}.mp4"] = mp4_bytes(video_frames(colour, step))
    rows = demo_rows()
    files["demo/data.json"] = dumps(rows)

    shared = tokenizer_files(train_tokenizer(rows))
    files.update({f"tokenizer/{name}": data for name, data in shared.items()})
    variants = {}
    for spec in FAMILIES.values():
        folder = f"models/{spec.fixture}"
        own = recipe(spec)
        tokenizer = shared
        if own.tokenizer is not None:
            if own.tokenizer not in variants:  # GLM-4V and GLM-4V-MoE share theirs
                late, extra, attributes = TOKENIZER_VARIANTS[own.tokenizer]
                variants[own.tokenizer] = tokenizer_files(train_tokenizer(rows, late, extra), late, extra, attributes)
            tokenizer = variants[own.tokenizer]
        audio = model_config(spec).get("audio_config")
        for name, data in {**model_files(spec), **processor_files(own, audio), **tokenizer}.items():
            files[f"{folder}/{name}"] = data
    return files


def _same(path: Path, data: bytes) -> bool:
    return path.is_file() and path.read_bytes() == data


def write(files: dict[str, bytes], out: Path) -> list[str]:
    written = []
    for rel, data in sorted(files.items()):
        path = out / rel
        if _same(path, data):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(rel)
    return written


def summary(files: dict[str, bytes], written: list[str], verb: str = "written") -> str:
    import av
    import PIL
    import tokenizers
    import transformers

    groups: dict[str, list[int]] = {}
    for rel, data in files.items():
        parts = rel.split("/")
        key = "/".join(parts[:2]) if parts[0] == "models" else parts[0] + ("/" + parts[1] if len(parts) > 2 else "")
        groups.setdefault(key, []).append(len(data))
    lines = [f"{'folder':<28} {'files':>5} {'KiB':>8}"]
    for key in sorted(groups):
        lines.append(f"{key:<28} {len(groups[key]):>5} {sum(groups[key]) / 1024:>8.1f}")
    total = sum(len(d) for d in files.values())
    digest = hashlib.sha256(b"".join(rel.encode() + hashlib.sha256(d).digest() for rel, d in sorted(files.items())))
    lines.append(f"{'total':<28} {len(files):>5} {total / 1024:>8.1f}")
    lines.append(f"{len(written)} {verb}, {len(files) - len(written)} unchanged; sha256 {digest.hexdigest()[:16]}")
    versions = (transformers, tokenizers, PIL, av)
    lines.append("(" + ", ".join(f"{module.__name__} {module.__version__}" for module in versions) + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the fixtures on disk differ from a rebuild")
    parser.add_argument("--out", type=Path, default=FIXTURES, help="where to write (default: fixtures/)")
    args = parser.parse_args(argv)
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        parser.error(f"run with transformers 5.x (found {transformers.__version__}): see the checkpoint layout note")
    files = build()
    if args.check:
        stale = [rel for rel, data in sorted(files.items()) if not _same(args.out / rel, data)]
        print(summary(files, stale, verb="differ"))
        for rel in stale:
            print(f"differs: {rel}", file=sys.stderr)
        return 1 if stale else 0
    written = write(files, args.out)
    print(summary(files, written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
