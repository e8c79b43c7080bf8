"""What will train: a per-component report of ``requires_grad`` for Qwen-VL models.

Reads parameter names only, so it works on all four families, on PEFT-wrapped models (``base_model.model.``
prefix, LoRA parameters count towards the module they adapt, a ``modules_to_save`` copy counts as the module
it replaces and PEFT's frozen original beside it, which the forward never runs, is counted apart), on FSDP2
(full sizes of the sharded parameters) and on names from older releases (``visual.blocks.N`` /
``model.layers.N``). Example of ``TrainableReport.format()``::

    trainable parameters: 1,234,567 of 8,291,375,616 (0.01%)
      vision blocks      blocks 0-11 trainable, 12-31 frozen              ...
      merger             trainable                                          ...
      decoder layers     layers 0-27 partly trainable                       ...
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch

from qwenvl.train.optim import classify, deepstack_index, in_vision_tower

__all__ = ["TrainableReport", "trainable_report", "log_trainable_report", "compress_ranges", "upstream_trainable_lines"]

_logger = logging.getLogger(__name__)

# Components in report order; `counts` has exactly these keys.
COMPONENTS = (
    "vision_embeddings",
    "vision_blocks",
    "merger",
    "deepstack_mergers",
    "embeddings",
    "decoder_layers",
    "lm_head",
    "other",
)

_VISION_BLOCK = re.compile(r"(?:^|\.)visual\.blocks\.(\d+)\.")
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# PEFT's ModulesToSaveWrapper: the trained copy `<module>.modules_to_save.<adapter>.<rest>` runs in the forward,
# the frozen `<module>.original_module.<rest>` does not.
_PEFT_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")
_PEFT_ORIGINAL = ".original_module."


def _locate(name: str) -> tuple[str, int | None]:
    """(component, index) of a parameter name; index for blocks, deepstack mergers and decoder layers.

    The optimizer's component (``qwenvl.train.optim.classify``, the one rule) refined into the report's rows."""
    component = classify(name)
    if component == "projector":
        if (index := deepstack_index(name)) is not None:
            return "deepstack_mergers", index
        return "merger", None  # the merger (GLM-4V: and its 2x2 downsample into the text width)
    if component == "vision":
        if not in_vision_tower(name):
            return "other", None  # the Qwen3-Omni thinker's audio encoder: no vision row fits it
        if m := _VISION_BLOCK.search(name):
            return "vision_blocks", int(m.group(1))
        return "vision_embeddings", None
    if "embed_tokens" in name:
        return "embeddings", None
    if m := _DECODER_LAYER.search(name):
        return "decoder_layers", int(m.group(1))
    if "lm_head" in name:
        return "lm_head", None
    return "other", None


def _status(trainable: int, total: int) -> str:
    if total == 0:
        return "absent"
    if trainable == 0:
        return "frozen"
    return "trainable" if trainable == total else "partly trainable"


def compress_ranges(indices) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: list[str] = []
    values = sorted(set(indices))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


@dataclass
class TrainableReport:
    """Which parts of a Qwen-VL model have ``requires_grad`` parameters.

    Status strings are ``"trainable"`` (every parameter), ``"partly trainable"``, ``"frozen"`` or ``"absent"``.
    Parameter counts are element counts, each shared (tied) parameter counted once.
    """

    vision_blocks_trainable: list[int] = field(default_factory=list)
    vision_blocks_partial: list[int] = field(default_factory=list)
    vision_blocks_frozen: list[int] = field(default_factory=list)
    vision_embeddings: str = "absent"
    merger: str = "absent"
    deepstack_mergers_trainable: list[int] = field(default_factory=list)
    deepstack_mergers_partial: list[int] = field(default_factory=list)
    deepstack_mergers_frozen: list[int] = field(default_factory=list)
    embeddings: str = "absent"
    layers_trainable: list[int] = field(default_factory=list)
    layers_partial: list[int] = field(default_factory=list)
    layers_frozen: list[int] = field(default_factory=list)
    lm_head: str = "absent"
    lm_head_tied: bool = False
    other: str = "absent"
    # parameters of PEFT's frozen originals of modules_to_save (not in the counts: the forward runs the copies)
    peft_originals: int = 0
    # component -> (trainable, total)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.counts.values())

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts.values())

    @property
    def deepstack_mergers(self) -> str:
        return _overall(self.deepstack_mergers_trainable, self.deepstack_mergers_partial, self.deepstack_mergers_frozen)

    def format(self) -> str:
        total = self.total
        pct = 100.0 * self.trainable / total if total else 0.0
        lines = [f"trainable parameters: {self.trainable:,} of {total:,} ({pct:.2f}%)"]
        rows = [
            ("vision embeddings", self.vision_embeddings, "vision_embeddings"),
            (
                "vision blocks",
                _indexed("blocks", self.vision_blocks_trainable, self.vision_blocks_partial, self.vision_blocks_frozen),
                "vision_blocks",
            ),
            ("merger", self.merger, "merger"),
            (
                "deepstack mergers",
                _indexed(
                    "mergers",
                    self.deepstack_mergers_trainable,
                    self.deepstack_mergers_partial,
                    self.deepstack_mergers_frozen,
                ),
                "deepstack_mergers",
            ),
            ("embeddings", self.embeddings, "embeddings"),
            (
                "decoder layers",
                _indexed("layers", self.layers_trainable, self.layers_partial, self.layers_frozen),
                "decoder_layers",
            ),
            ("lm_head", "tied to embeddings" if self.lm_head_tied else self.lm_head, "lm_head"),
            ("other", self.other, "other"),
        ]
        for label, text, key in rows:
            trainable, count = self.counts.get(key, (0, 0))
            if count == 0 and not (key == "lm_head" and self.lm_head_tied):
                continue
            lines.append(f"  {label:<18} {text:<52} {trainable:>13,} / {count:,}")
        if self.peft_originals:
            originals = f"{self.peft_originals:,} parameters of PEFT's frozen originals of modules_to_save"
            lines.append(f"  (not counted: {originals})")
        return "\n".join(lines)


def _overall(trainable: list[int], partial: list[int], frozen: list[int]) -> str:
    if not (trainable or partial or frozen):
        return "absent"
    if partial or (trainable and frozen):
        return "partly trainable"
    return "trainable" if trainable else "frozen"


def _indexed(noun: str, trainable: list[int], partial: list[int], frozen: list[int]) -> str:
    parts = [
        f"{compress_ranges(indices)} {what}"
        for indices, what in ((trainable, "trainable"), (partial, "partly trainable"), (frozen, "frozen"))
        if indices
    ]
    return f"{noun} {', '.join(parts)}" if parts else "absent"


def _numel(param: torch.Tensor) -> int:
    # DeepSpeed ZeRO-3 leaves an empty placeholder and records the real size in `ds_numel`.
    return int(getattr(param, "ds_numel", param.numel()))


def trainable_report(model: torch.nn.Module, *, prefix: str = "") -> TrainableReport:
    """Summarise ``requires_grad`` over ``model``'s parameters by Qwen-VL component.

    ``prefix`` is the name ``model`` has inside the whole model (``"visual."`` for a vision tower on its own),
    so that its parameters are placed as they would be there.
    """
    counts = {component: [0, 0] for component in COMPONENTS}
    # (component, index) -> [trainable params, params]
    per_unit: dict[tuple[str, int | None], list[int]] = {}
    seen: dict[int, str] = {}
    tied_lm_head = False
    originals: dict[int, int] = {}  # PEFT's frozen originals of modules_to_save: id -> size
    for name, param in model.named_parameters(remove_duplicate=False):
        if _PEFT_ORIGINAL in name:
            originals[id(param)] = _numel(param)
            continue
        component, index = _locate(prefix + _PEFT_COPY.sub(".", name))
        if id(param) in seen:
            # A tied parameter: report it under its first owner only, so counts add up to the model's total.
            tied_lm_head |= component == "lm_head" and seen[id(param)] == "embeddings"
            continue
        seen[id(param)] = component
        unit = per_unit.setdefault((component, index), [0, 0])
        unit[0] += bool(param.requires_grad)
        unit[1] += 1
        n = _numel(param)
        counts[component][0] += n if param.requires_grad else 0
        counts[component][1] += n

    def lists(component: str) -> tuple[list[int], list[int], list[int]]:
        trainable, partial, frozen = [], [], []
        for (c, index), (t, n) in sorted(per_unit.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            if c == component:
                {"trainable": trainable, "partly trainable": partial, "frozen": frozen}[_status(t, n)].append(index)
        return trainable, partial, frozen

    def status(component: str) -> str:
        t, n = per_unit.get((component, None), (0, 0))
        return _status(t, n)

    blocks, layers, deepstack = lists("vision_blocks"), lists("decoder_layers"), lists("deepstack_mergers")
    return TrainableReport(
        vision_blocks_trainable=blocks[0],
        vision_blocks_partial=blocks[1],
        vision_blocks_frozen=blocks[2],
        vision_embeddings=status("vision_embeddings"),
        merger=status("merger"),
        deepstack_mergers_trainable=deepstack[0],
        deepstack_mergers_partial=deepstack[1],
        deepstack_mergers_frozen=deepstack[2],
        embeddings=status("embeddings"),
        layers_trainable=layers[0],
        layers_partial=layers[1],
        layers_frozen=layers[2],
        lm_head=status("lm_head"),
        lm_head_tied=tied_lm_head,
        other=status("other"),
        counts={component: (t, n) for component, (t, n) in counts.items()},
        peft_originals=sum(originals.values()),
    )


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for var in ("RANK", "LOCAL_RANK"):
        if os.environ.get(var, "").strip():
            return int(os.environ[var])
    return 0


def log_trainable_report(model: torch.nn.Module, logger: logging.Logger | None = None) -> TrainableReport | None:
    """Log ``trainable_report(model).format()`` at INFO on rank 0; return the report there, ``None`` elsewhere."""
    if _rank() != 0:
        return None
    report = trainable_report(model)
    (logger or _logger).info("%s", report.format())
    return report


def upstream_trainable_lines(module: torch.nn.Module) -> str:
    """The upstream fine-tuning trainer's ``print_trainable_parameters`` lines, from :func:`trainable_report`.

    For a vision tower (a module with ``blocks``)::

        Vision Module - Attention Blocks:
        Trainable Block Indices: [0, 1]           (every parameter of the block trains)
        Non-Trainable Block Indices: None
        Merger Module Trainable: True             (any parameter of the merger trains)

    For a language model (or a model holding one as ``language_model``)::

        LLM Module - Embed Tokens Trainable: True (any parameter)
        LLM Module - Trainable Layer Indices: [0, 1]   (any parameter of the layer)
        LLM Module - Non-Trainable Layer Indices: None
    """

    def listed(indices) -> str:
        return str(sorted(indices)) if indices else "None"

    def trains(status: str) -> bool:
        return status in ("trainable", "partly trainable")

    if hasattr(module, "blocks"):
        report = trainable_report(module, prefix="visual.")
        return "\n".join(
            [
                "Vision Module - Attention Blocks:",
                f"Trainable Block Indices: {listed(report.vision_blocks_trainable)}",
                f"Non-Trainable Block Indices: {listed(report.vision_blocks_partial + report.vision_blocks_frozen)}",
                f"Merger Module Trainable: {trains(report.merger)}",
            ]
        )
    report = trainable_report(getattr(module, "language_model", module))
    return "\n".join(
        [
            f"LLM Module - Embed Tokens Trainable: {trains(report.embeddings)}",
            f"LLM Module - Trainable Layer Indices: {listed(report.layers_trainable + report.layers_partial)}",
            f"LLM Module - Non-Trainable Layer Indices: {listed(report.layers_frozen)}",
        ]
    )
