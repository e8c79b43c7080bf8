"""``SupervisedDataset``: rows of the Qwen-VL fine-tuning format (``qwenvl.data.rows``), through the model's real
processor.

The processor does everything model-specific: the chat template, image and video preprocessing,
``mm_token_type_ids`` where the release emits them. Labels are -100 except the assistant replies (and the
end-of-turn token that closes each), found between the template's own role markers::

    <|im_start|>user\\n<|vision_start|><|image_pad|>..<|vision_end|>What is this?<|im_end|>\\n
    <|im_start|>assistant\\n A  cat . <|im_end|> \\n
    labels: -100 ...                                                       A  cat . <|im_end|> -100

The markers are read off the template (the text its generation prompt adds, the token that ends a turn),
never assumed, and a row whose text contains a special token is refused: it could forge a marker.

Every row is checked when the dataset is built: media files present and their headers
readable, tag counts matching the media, a well-formed conversation with an assistant turn, the length within
``model_max_length``. A bad row raises ``BadSampleError`` naming the file and the row, or with
``skip_bad_samples=True`` is left out and counted in ``summary()``.

An image row's length comes from its templated text and its images' header sizes (``qwenvl.data.lengths``),
a video row's from its containers' headers (``qwenvl.data.video_lengths``), without decoding a pixel; media are
decoded and processed when the row is read (``__getitem__``, in the DataLoader's workers), where a file that fails
to decode stops the run naming the file and the row. Rows with both images and videos, and every row where the
processor's length rule does not match the processor, are processed in full up front. The rows themselves stay
on disk (``qwenvl.data.row_index``): per row the dataset keeps a few numbers in arrays.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from qwenvl.data.length_cache import BAD, CUT, OK, length_cache_key, load_lengths, save_lengths
from qwenvl.data.lengths import template_ids, probe_length_rule
from qwenvl.data.media import image_size, load_video, open_image
from qwenvl.data.video_lengths import NoFrameCount, container_metadata, probe_video_rule
from qwenvl.data.processor import VideosUnavailable, videos_available
from qwenvl.data.replies import Replies
from qwenvl.data.row_index import AdmittedRows, Ints, RowIndex, check_rows, index_files, read_rows
from qwenvl.data.rows import BadSampleError, DataFileError, RowRef, _check_row, _Row, _specs
from qwenvl.data.collators import IGNORE_INDEX, SKIPPED_KEY, VISION_KEYS, masked_segment
from qwenvl.positions import rope_index

__all__ = ["SupervisedDataset", "BadSampleError", "DataFileError", "RowRef", "read_rows", "check_rows", "IGNORE_INDEX", "sample_item"]
logger = logging.getLogger(__name__)
def sample_item(model, out, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One sample as the collators take it, from the processor's output ``out`` (batch of one) and the sample's
    ``input_ids`` / ``labels`` ``(L,)`` (cut to length): its vision tensors (``VISION_KEYS``), its
    ``mm_token_type_ids`` and its mrope ``position_ids (3, L)`` from the model's own ``get_rope_index``, with the
    video's seconds per temporal patch (Qwen2.5-VL places a video's frames in time by them)."""
    item = {"input_ids": input_ids, "labels": labels}
    for key in VISION_KEYS:
        if out.get(key) is not None:
            item[key] = torch.as_tensor(out[key])
    if out.get("mm_token_type_ids") is not None:
        item["mm_token_type_ids"] = out["mm_token_type_ids"][0, : input_ids.numel()].to(torch.int32)
    item["position_ids"] = rope_index(
        model,
        input_ids[None],
        image_grid_thw=item.get("image_grid_thw"),
        video_grid_thw=item.get("video_grid_thw"),
        second_per_grid_ts=item.get("second_per_grid_ts"),
    )[:, 0]
    return item


class SupervisedDataset(torch.utils.data.Dataset):
    """Qwen-VL fine-tuning rows as training samples (see the module docstring).

    Args:
        data_path: a data file, several comma-separated (``"a.json,b.jsonl%50"``), or a list of them.
        processor: the model's transformers processor (``AutoProcessor.from_pretrained(model_dir)``).
        model: the model whose ``get_rope_index`` gives each sample's mrope positions.
        model_max_length: the most tokens a sample may have (vision tokens count). A longer one is cut at
            the end if the cut falls in text after the last image or video (``truncate=True``); otherwise
            it is bad data.
        skip_bad_samples: leave bad rows out (counted in ``summary()``) instead of raising.
        num_workers: threads for the eager check.
        seed: for ``%N`` sampling.

    Items are dicts of tensors: ``input_ids (L,)``, ``labels (L,)``, ``position_ids (3, L)``, and as the
    row needs ``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``,
    ``second_per_grid_ts``, ``mm_token_type_ids``.
    """

    def __init__(
        self,
        data_path: str | Sequence[str],
        processor,
        *,
        model,
        model_max_length: int,
        truncate: bool = True,
        skip_bad_samples: bool = False,
        num_workers: int = 4,
        seed: int = 0,
        header_lengths: bool = True,
        length_cache: bool = True,
    ) -> None:
        if model_max_length <= 0:
            raise ValueError(f"model_max_length must be positive, got {model_max_length}")
        self.processor = processor
        self.model = model
        self.model_max_length = int(model_max_length)
        self.truncate = truncate
        self.skip_bad_samples = skip_bad_samples
        self._replies = Replies(processor)
        self._rule = self._video_rule = None
        self._video_probed = not header_lengths  # probed at the first video row
        self.length_cache_path = None
        key = self._cache_key(data_path, seed, header_lengths) if length_cache else None
        cached = load_lengths(key) if key else None
        if cached is not None:
            arrays, problems, self.length_cache_path = cached
            index = RowIndex(index_files(data_path), arrays)
            logger.info("lengths of %d rows from the cache %s", len(index), self.length_cache_path)
        else:
            index = read_rows(data_path, seed=seed)
            if header_lengths:
                self._rule, why = probe_length_rule(processor, model)
                if self._rule is None:
                    logger.info("image rows are processed in full to learn their lengths: %s", why)
            arrays, problems = self._admit_all(index, num_workers)
            if key:
                self.length_cache_path = save_lengths(key, {**arrays, **index.arrays}, problems)
        self._keep(index, arrays, problems)
        if not len(self.rows):
            raise DataFileError(f"every row of {data_path} was bad ({len(self.skipped)} skipped): nothing to train on")

    def _keep(self, index: RowIndex, arrays: dict[str, np.ndarray], problems: dict[int, str]) -> None:
        """The admitted rows (``rows``: parsed from disk when read), their ``lengths`` (``Ints``) and video flags,
        and the rows ``truncated`` and ``skipped``; in a strict run the first bad row raises here."""
        status = arrays["status"]
        bad = np.flatnonzero(status == BAD)
        if len(bad) and not self.skip_bad_samples:
            raise BadSampleError(index.ref(bad[0]), problems[int(bad[0])])
        self.skipped: list[tuple[RowRef, str]] = [(index.ref(i), problems[int(i)]) for i in bad]
        self.truncated: list[RowRef] = [index.ref(i) for i in np.flatnonzero(status == CUT)]
        kept = np.flatnonzero(status != BAD)
        self.rows = AdmittedRows(index.take(kept))
        self.lengths = Ints(arrays["lengths"][kept].astype(np.int32))
        self._videos = arrays["videos"][kept].astype(np.int8)

    def _cache_key(self, data_path, seed: int, header_lengths: bool) -> str | None:
        try:
            return length_cache_key(
                _specs(data_path), self.processor, self.model, seed=seed, model_max_length=self.model_max_length,
                truncate=self.truncate, header=header_lengths,
            )
        except Exception as exc:  # a processor or tokenizer we cannot fingerprint: no cache, said once
            logger.info("no length cache: %s: %s", type(exc).__name__, exc)
            return None

    @property
    def media_groups(self) -> list[int] | None:
        """For the packer: per sample 1 if it holds a video, else 0, where the model's family cannot take images
        and videos in one forward (GLM-4V: ``FamilySpec.mixes_media``); ``None`` where any samples may share a row."""
        from qwenvl.families import family_of_model

        if family_of_model(self.model).mixes_media():
            return None
        return self._videos.astype(bool).astype(int).tolist()

    def _admit_all(self, index: RowIndex, num_workers: int) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Per row of ``index``, its ``status`` (``OK``, ``CUT``, ``BAD``), ``lengths`` and ``videos`` (whether it holds
        one), and the problem of each bad row, a chunk of rows at a time: rows the length rule covers with one
        batched template render and tokenizer call a chunk, the others processed in threads. Parsed rows live only
        for their chunk: a million rows are never all parsed at once."""
        status, lengths, videos = (np.zeros(len(index), dtype=t) for t in (np.int8, np.int32, np.int8))
        problems: dict[int, str] = {}
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            for start in range(0, len(index), _HEADER_CHUNK):
                by_header: list[tuple[int, _Row]] = []
                processed: list[tuple[int, _Row]] = []
                for i, (ref, raw) in enumerate(index.chunk(start, start + _HEADER_CHUNK), start):
                    try:
                        row = _check_row(ref, raw)
                    except BadSampleError as exc:
                        status[i], problems[i] = BAD, exc.problem
                        continue
                    videos[i] = bool(row.videos)
                    (by_header if self._by_header(row) else processed).append((i, row))
                # anything else a row can trip (the template, the processor, the positions) is still named
                done = list(pool.map(lambda pair: _named(pair[1], self._admit, pair[1]), processed)) if processed else []
                # The header pass is Python-bound (a template render, a few list walks, a 100-byte header read a
                # row): threads would only add their hand-offs to it.
                if by_header:
                    done += self._admit_by_header_chunk([row for _, row in by_header])
                for (i, _), result in zip(processed + by_header, done):
                    if isinstance(result, BadSampleError):
                        status[i], problems[i] = BAD, result.problem
                    else:
                        _, lengths[i], truncated = result
                        status[i] = CUT if truncated else OK
        return {"status": status, "lengths": lengths, "videos": videos}, problems

    def _by_header(self, row: _Row) -> bool:
        """Whether the row's length comes from headers: image rows by the image rule, video rows (without images)
        by the video rule (``qwenvl.data.video_lengths``, probed at the first video row)."""
        if not row.videos:
            return self._rule is not None
        if not self._video_probed:
            self._video_probed = True
            if videos_available(self.processor):  # else every video row is refused by name when processed
                self._video_rule, why = probe_video_rule(self.processor)
                if self._video_rule is None:
                    logger.info("video rows are processed in full to learn their lengths: %s", why)
        return self._video_rule is not None and not row.images

    def _admit_by_header_chunk(self, rows: list[_Row]) -> list:
        texts, ids = [None] * len(rows), [None] * len(rows)
        try:
            texts = self.processor.apply_chat_template([r.messages for r in rows], tokenize=False, add_generation_prompt=False)
            tokenizer = getattr(self.processor, "tokenizer", self.processor)
            plain = [i for i, row in enumerate(rows) if not row.videos]  # a video row's text is expanded first
            for i, row_ids in zip(plain, tokenizer([texts[i] for i in plain], add_special_tokens=False)["input_ids"]):
                ids[i] = row_ids
        except Exception:  # one row's template failed the chunk: each row on its own says which
            texts, ids = [None] * len(rows), [None] * len(rows)
        return [_named(row, self._admit_by_header, row, row_ids, text) for row, row_ids, text in zip(rows, ids, texts)]

    def _admit(self, row: _Row) -> tuple[_Row, int, bool]:
        """A row the length rule does not cover (videos, or no rule here): processed in full to learn its length."""
        if row.images and row.videos:
            from qwenvl.families import family_of_model

            spec = family_of_model(self.model)
            if not spec.mixes_media():
                raise BadSampleError(row.ref, f"images and videos in one row: {spec.name} cannot take both in one forward")
        item, truncated = self._process(row)
        return row, int(item["input_ids"].numel()), truncated

    @property
    def _end_id(self) -> int:
        """The token that ends a turn (``Replies.end_id``)."""
        return self._replies.end_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            item = self._process(self.rows[index])[0]
        except BadSampleError as exc:  # it passed the checks up front, then failed to decode (in a worker)
            if not self.skip_bad_samples:
                raise
            return self._stand_in(index, exc)
        if item["input_ids"].numel() != self.lengths[index]:
            # The packer placed this sample by its admitted length: a disagreement is a bug, never trained on.
            raise RuntimeError(
                f"{self.rows[index].ref}: processed to {item['input_ids'].numel()} tokens, but its length from the "
                f"text and image headers was {self.lengths[index]}: "
                + (
                    f"its media changed since the length cache {self.length_cache_path} was written (delete it)"
                    if self.length_cache_path is not None
                    else "qwenvl's length rule disagrees with this processor (report it; header_lengths=False "
                    "processes every row up front instead)"
                )
            )
        return item

    def _stand_in(self, index: int, exc: BadSampleError) -> dict[str, torch.Tensor]:
        """What a row that fails to decode in training becomes with ``skip_bad_samples``: a segment of its
        admitted length that no loss sees (padding ids, every label ignored, text positions), so its packed row
        keeps its shape, and ``SKIPPED_KEY`` naming the row and the problem (counted by the trainer)."""
        item = masked_segment(self.lengths[index], getattr(self.processor.tokenizer, "pad_token_id", None) or 0)
        item[SKIPPED_KEY] = f"{exc.ref}: {exc.problem}"
        return item

    def _admit_by_header(self, row: _Row, ids: list[int] | None = None, text: str | None = None) -> tuple[_Row, int, bool]:
        """The row's length from its templated text (``ids``: its tokens, if already computed) and its images'
        header sizes (``qwenvl.data.lengths``) or its videos' (``qwenvl.data.video_lengths``), with the same checks
        and the same cut as processing it would give; nothing is decoded."""
        self._replies.check_text(row)
        if row.videos:
            return self._admit_video_by_header(row, text)
        if ids is None:
            ids = template_ids(self.processor, row.messages)
        sizes = [image_size(row.ref, path) for path in row.images]
        try:
            positions, length, last_vision = self._rule.expand(ids, self._rule.image_tokens(sizes))
        except ValueError:  # the template placed the images otherwise: let the processor say
            item, truncated = self._process(row)
            return row, int(item["input_ids"].numel()), truncated
        return self._judged(row, ids, positions, length, last_vision)

    def _admit_video_by_header(self, row: _Row, text: str | None) -> tuple[_Row, int, bool]:
        """A video row (no images): its text expanded as the processor expands it, from each container's header."""
        if text is None:
            text = self.processor.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=False)
        try:
            metadata = [container_metadata(row.ref, path) for path in row.videos]
            expanded = self._video_rule.expand(text, metadata)
        except NoFrameCount:  # nothing to count by (no header count, or too few frames for the rule): processed
            item, truncated = self._process(row)
            return row, int(item["input_ids"].numel()), truncated
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
        vision = _vision_token_ids(self.model)
        last_vision = max((j for j, token in enumerate(ids) if token in vision), default=-1)
        return self._judged(row, ids, range(len(ids)), len(ids), last_vision)

    def _judged(self, row: _Row, ids, positions, length: int, last_vision: int) -> tuple[_Row, int, bool]:
        """The row kept whole, cut in text, or refused, from its template ``ids``, each one's processed position,
        its processed length and the last position of a vision-span token."""
        replies = self._replies.spans(row, ids)
        limit = self.model_max_length
        if length <= limit:
            return row, length, False
        if not self.truncate:
            raise BadSampleError(row.ref, f"{length} tokens, more than model_max_length {limit}")
        if last_vision >= limit:
            raise BadSampleError(
                row.ref,
                f"{length} tokens, more than model_max_length {limit}, and the cut would fall inside "
                f"an image or video (vision tokens up to position {last_vision}); raise model_max_length",
            )
        if positions[replies[0][0]] >= limit:  # the first trained token is the earliest
            raise BadSampleError(row.ref, f"no assistant token left within model_max_length {limit}")
        return row, limit, True

    def summary(self) -> str:
        text = f"{len(self.rows)} samples, {int(self.lengths.values.sum())} tokens"
        if self.truncated:
            text += f"; {len(self.truncated)} truncated to {self.model_max_length} tokens"
        if self.skipped:
            reasons = Counter(problem.split(":")[0].split(" file ")[0] for _, problem in self.skipped)
            text += f"; {len(self.skipped)} bad rows skipped (" + ", ".join(f"{n}x {r}" for r, n in reasons.items()) + ")"
        return text

    # -- one row -------------------------------------------------------------------------------------------

    def _process(self, row: _Row) -> tuple[dict[str, torch.Tensor], bool]:
        self._replies.check_text(row)
        text = self.processor.apply_chat_template(row.messages, tokenize=False, add_generation_prompt=False)
        images = [open_image(row.ref, p) for p in row.images] or None
        videos, extra = None, {}
        if row.videos:
            if not videos_available(self.processor):
                raise BadSampleError(row.ref, "videos need torchvision: transformers' video processors need it and it is not installed here")
            decoded = [load_video(row.ref, p) for p in row.videos]
            videos, extra["video_metadata"] = [v for v, _ in decoded], [m for _, m in decoded]
        try:
            out = self.processor(text=[text], images=images, videos=videos, return_tensors="pt", **extra)
        except VideosUnavailable as exc:
            raise BadSampleError(row.ref, f"videos need torchvision: {exc}") from None
        except Exception as exc:  # the processor's own message, with the row named
            raise BadSampleError(row.ref, f"the processor failed: {type(exc).__name__}: {exc}") from exc
        input_ids = out["input_ids"][0].long()
        labels = self._replies.labels(row, input_ids)
        truncated = False
        if input_ids.numel() > self.model_max_length:
            input_ids, labels, truncated = self._cut(row, out, input_ids, labels)
        return sample_item(self.model, out, input_ids, labels), truncated

    def _cut(self, row: _Row, out, input_ids: torch.Tensor, labels: torch.Tensor):
        limit = self.model_max_length
        if not self.truncate:
            raise BadSampleError(row.ref, f"{input_ids.numel()} tokens, more than model_max_length {limit}")
        # Every token of the family's vision spans (FamilySpec.tokens: GLM-4V's <begin_of_image> / <end_of_image>
        # and its video wrapper included), so a cut never lands between a placeholder and its span's end.
        vision = torch.isin(input_ids, torch.tensor(sorted(_vision_token_ids(self.model)), dtype=input_ids.dtype))
        last_vision = int(torch.nonzero(vision).max()) if vision.any() else -1
        if last_vision >= limit:
            raise BadSampleError(
                row.ref,
                f"{input_ids.numel()} tokens, more than model_max_length {limit}, and the cut would fall inside "
                f"an image or video (vision tokens up to position {last_vision}); raise model_max_length",
            )
        labels = labels[:limit]
        if not (labels != IGNORE_INDEX).any():
            raise BadSampleError(row.ref, f"no assistant token left within model_max_length {limit}")
        return input_ids[:limit], labels, True


# Rows per batched template render and tokenizer call in the length pass.
_HEADER_CHUNK = 512


def _vision_token_ids(model) -> frozenset[int]:
    """Every token of the family's vision spans (``FamilySpec.tokens``), as the cut judges them."""
    from qwenvl.families import family_of_model

    config = model.config
    return frozenset(t for name in family_of_model(model).tokens.keys() if (t := getattr(config, name, None)) is not None)


def _named(row: _Row, admit, *args):
    """``admit(*args)``, with anything a row can trip turned into its ``BadSampleError`` (returned, not raised)."""
    try:
        return admit(*args)
    except BadSampleError as exc:
        return exc
    except Exception as exc:
        return BadSampleError(row.ref, f"{type(exc).__name__}: {exc}")
