"""Loading a model's real transformers processor, with videos refused clearly where they cannot work.

transformers' Qwen-VL video processors need torchvision, and ``AutoProcessor`` fails outright without it,
images included. PyPI has no torchvision that imports beside the CPU torch wheels CI uses, so without it
the processor is assembled from the model directory's own image processor, tokenizer and chat template,
and a video processor that refuses, naming the missing package. Images and text then go through exactly
the classes ``AutoProcessor`` would pick; a row with a video is bad data there (named, or skipped).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import shutil
from pathlib import Path

__all__ = ["load_processor", "save_processor", "videos_available", "VideosUnavailable"]

logger = logging.getLogger(__name__)


class VideosUnavailable(RuntimeError):
    pass


def load_processor(model_dir: str | Path):
    """``AutoProcessor.from_pretrained(model_dir)``; without torchvision, the same processor minus videos."""
    import transformers
    from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer
    from transformers.video_processing_utils import BaseVideoProcessor

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(model_dir)
    try:
        return AutoProcessor.from_pretrained(model_dir)
    except (ImportError, ValueError) as exc:
        if "torchvision" not in str(exc).lower():
            raise
    except TypeError:
        pass  # 5.0.0: AutoVideoProcessor iterates a mapping whose entries are None without torchvision
    processor_cls = getattr(transformers, _processor_class_name(model_dir))
    image_processor = _image_processor(model_dir)

    class NoVideoProcessor(BaseVideoProcessor):
        merge_size = getattr(image_processor, "merge_size", 2)
        temporal_patch_size = getattr(image_processor, "temporal_patch_size", 2)
        patch_size = getattr(image_processor, "patch_size", None)

        def __call__(self, *args, **kwargs):
            raise VideosUnavailable(
                "transformers' video processors need it and it is not installed here; install the torchvision "
                "release that matches your torch"
            )

        preprocess = __call__

    _REFUSING.append(NoVideoProcessor)

    class ImagesOnlyProcessor(processor_cls):
        """The model's own processor class; only the type check of the refusing video processor is relaxed
        (transformers' check looks the class up in mappings that are placeholders without torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if isinstance(argument, NoVideoProcessor):
                return NoVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

        def __reduce__(self):
            # A class made here cannot be pickled by name: a DataLoader worker started afresh (forkserver, spawn)
            # loads the same processor from the same folder instead.
            return load_processor, (model_dir,)

    ImagesOnlyProcessor.__name__ = processor_cls.__name__
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parts = {"image_processor": image_processor, "tokenizer": tokenizer, "video_processor": NoVideoProcessor()}
    if "feature_extractor" in inspect.signature(processor_cls.__init__).parameters:
        # Qwen3-Omni's processor holds an audio feature extractor too (it needs no torchvision).
        parts["feature_extractor"] = AutoFeatureExtractor.from_pretrained(model_dir)
    processor = ImagesOnlyProcessor(
        **parts, chat_template=getattr(tokenizer, "chat_template", None) or _chat_template(model_dir)
    )
    logger.warning("qwenvl: torchvision is not installed: %s loaded for images and text only", processor_cls.__name__)
    return processor


def _image_processor(model_dir):
    """The model's image processor without torchvision. ``AutoImageProcessor`` picks the torchvision backend on
    5.x releases that have one (5.10: ``Qwen2VLImageProcessor`` needs torchvision, ``Qwen2VLImageProcessorPil``
    does not; ``use_fast=False`` does not change that); there the PIL class of the configured processor is used."""
    import json

    import transformers
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_dir)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
        config = Path(model_dir) / "preprocessor_config.json"
        name = json.loads(config.read_text()).get("image_processor_type", "") if config.is_file() else ""
        pil = getattr(transformers, f"{name.removesuffix('Fast')}Pil", None) if name else None
        if pil is None:
            raise
        return pil.from_pretrained(model_dir)


def _processor_class_name(model_dir) -> str:
    """The processor class the model directory names (``processor_class``, as ``AutoProcessor`` reads it), else
    the one transformers maps its model type to. A Qwen3-Omni thinker directory needs the first: no release maps
    ``qwen3_omni_moe_thinker`` to a processor, and 4.57's ``AutoConfig`` does not know that model type."""
    import json

    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            found = json.loads(path.read_text()).get("processor_class")
            if found:
                return found
    return PROCESSOR_MAPPING_NAMES[AutoConfig.from_pretrained(model_dir).model_type]


def _chat_template(model_dir) -> str | None:
    path = Path(model_dir) / "chat_template.jinja"
    return path.read_text() if path.is_file() else None


def videos_available(processor) -> bool:
    """Whether ``processor`` can process videos (False for the images-only processor built above)."""
    return not isinstance(getattr(processor, "video_processor", None), _refusing_types())


def _refusing_types() -> tuple[type, ...]:
    return tuple(_REFUSING)


_REFUSING: list[type] = []


# What a model directory holds for its processor (transformers' file names, any release).
_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def save_processor(processor, model_dir: str | Path, output_dir: str | Path) -> None:
    """Save the processor beside a checkpoint. The images-only processor would write its refusing video
    processor in place of the real one, so there the model directory's own processor files are copied."""
    if videos_available(processor) or not Path(model_dir).is_dir():
        processor.save_pretrained(output_dir)
        return
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    for name in _PROCESSOR_FILES:
        if (Path(model_dir) / name).is_file():
            shutil.copy2(Path(model_dir) / name, Path(output_dir) / name)
