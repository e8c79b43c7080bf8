"""A sample's token count without decoding its images: the chat-templated text, tokenized, plus each image's
placeholder tokens from its header size through the processor's own resize rule.

The processor expands each image placeholder of the templated text into one token per merged patch::

    template ids   <|vision_start|> <|image_pad|>        <|vision_end|> What ...
    processed      <|vision_start|> <|image_pad|> x n_i  <|vision_end|> What ...    n_i from (height, width)

``n_i`` comes from the processor itself (``_get_num_multimodal_tokens``: ``smart_resize`` with the processor's
patch, merge and min/max pixels), never from a copy of its rule. A release whose helper disagrees with its own
processor (transformers 4.57's GLM-4V) is caught by :func:`probe_length_rule`, which processes a few probe
images of awkward sizes for real once, and the dataset then processes every row instead. Videos have their own
rule (frame sampling and, for Qwen3-VL and GLM-4V, timestamp text): ``qwenvl.data.video_lengths``.
"""

from __future__ import annotations

import logging
from typing import Sequence

__all__ = ["LengthRule", "probe_length_rule", "template_ids", "PROBE_SIZES"]

logger = logging.getLogger(__name__)

# (height, width): small (min_pixels applies; 4.57 refuses one below the patch factor), thin and wide, tall,
# large (max_pixels applies), odd sizes.
PROBE_SIZES = ((30, 33), (37, 300), (1000, 23), (4000, 3000), (129, 257))


class LengthRule:
    """Lengths of image (and text-only) samples from the templated token ids and the images' sizes."""

    def __init__(self, processor, image_token_id: int, vision_token_ids: frozenset[int]) -> None:
        self.processor = processor
        self.image_token_id = image_token_id
        self.vision_token_ids = vision_token_ids
        self._tokens: dict[tuple[int, int], int] = {}  # (height, width) -> placeholder tokens

    def image_tokens(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Placeholder tokens of each image, from its ``(height, width)`` (each size asked of the processor once:
        its kwargs merging costs ~0.4 ms a call)."""
        new = [list(s) for s in dict.fromkeys(sizes) if s not in self._tokens]
        if new:
            counts = self.processor._get_num_multimodal_tokens(image_sizes=new)["num_image_tokens"]
            self._tokens.update({tuple(s): int(n) for s, n in zip(new, counts)})
        return [self._tokens[tuple(s)] for s in sizes]

    def expand(self, ids: Sequence[int], counts: Sequence[int]) -> tuple[list[int], int, int]:
        """Where each template token lands once each placeholder becomes ``counts[k]`` tokens.

        Returns ``(positions, length, last_vision)``: the processed position of each template token (a
        placeholder's first one), the processed length, and the last position of any vision-span token (-1
        when none). Raises ``ValueError`` when the placeholders do not match ``counts`` one to one.
        """
        positions, offset, k, last_vision = [], 0, 0, -1
        for j, token in enumerate(ids):
            position = j + offset
            positions.append(position)
            if token == self.image_token_id:
                if k >= len(counts):
                    raise ValueError("more image placeholders in the template than images")
                last_vision = position + counts[k] - 1
                offset += counts[k] - 1
                k += 1
            elif token in self.vision_token_ids:
                last_vision = position
        if k != len(counts):
            raise ValueError(f"{k} image placeholders in the template for {len(counts)} images")
        return positions, len(ids) + offset, last_vision


def template_ids(processor, messages) -> list[int]:
    """The token ids of one conversation's chat-templated text, placeholders unexpanded."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def probe_length_rule(processor, model) -> tuple[LengthRule | None, str]:
    """A :class:`LengthRule` for this processor if it reproduces the processor's own lengths on probe images of
    :data:`PROBE_SIZES` (one row with all of them), else ``None`` and why."""
    from PIL import Image

    from qwenvl.families import UnknownFamilyError, family_of_model

    if not hasattr(processor, "_get_num_multimodal_tokens"):
        return None, f"{type(processor).__name__} has no _get_num_multimodal_tokens in this transformers release"
    try:
        spec = family_of_model(model)
    except UnknownFamilyError as exc:
        return None, str(exc)
    config = model.config
    image_token = getattr(config, spec.tokens.image, None)
    if image_token is None:
        return None, f"the config has no {spec.tokens.image}"
    vision = frozenset(t for name in spec.tokens.keys() if (t := getattr(config, name, None)) is not None)
    rule = LengthRule(processor, int(image_token), vision)
    content = [{"type": "image"} for _ in PROBE_SIZES] + [{"type": "text", "text": "Describe them."}]
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "No."}]}]
    images = [Image.new("RGB", (w, h), (120, 30, 200)) for h, w in PROBE_SIZES]
    try:
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        processed = int(processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1])
        _, estimated, _ = rule.expand(template_ids(processor, messages), rule.image_tokens(PROBE_SIZES))
    except Exception as exc:  # a processor that cannot do this: process every row, say why
        return None, f"the length rule failed on probe images: {type(exc).__name__}: {exc}"
    if estimated != processed:
        return None, (
            f"this release's {type(processor).__name__}._get_num_multimodal_tokens disagrees with the processor "
            f"({estimated} vs {processed} tokens on probe images)"
        )
    return rule, ""
