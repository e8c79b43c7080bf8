"""``qwenvl train``: from a JSON file of conversations to a checkpoint, on packed batches.

    qwenvl train --output_dir out                                   # tiny Qwen2.5-VL on the demo data, CPU
    qwenvl train --model_name_or_path Qwen/... --data_path train.json --output_dir out --bf16 \\
        --mm_projector_lr 1e-5 --vision_tower_lr 2e-6 --model_max_length 8192

    qwenvl train --streaming True --data_path 'shards/*.tar' --max_steps 10000 --output_dir out   # a stream

    torchrun --nproc_per_node 2 -m qwenvl.cli train --output_dir out ...           # DDP
    accelerate launch --config_file examples/accelerate_fsdp2.yaml -m qwenvl.cli train --output_dir out ...

Every ``transformers.TrainingArguments`` flag works (``HfArgumentParser`` over the dataclasses below and
``qwenvl.options.PatchOptions``, whose fields are ``qwenvl.patch``'s options: ``--backend``, ``--linear_backend``,
``--compile``, ``--fused_cross_entropy``; the old ``--attention_backend`` and ``--compile_regions`` still work);
three defaults differ from transformers': ``--per_device_train_batch_size 1`` (a packed batch is one row),
``--logging_steps 1``, ``--report_to none``. Under a launcher, each rank trains on rows packed from its own
shard of the samples, balanced by tokens (the imbalance is logged), and the vision dummy pass is on
(``qwenvl.train.distributed``): a rank without images still runs the vision tower, so DDP with
``--ddp_find_unused_parameters False`` (transformers' choice under gradient checkpointing) and FSDP2 / ZeRO-3
work with text-only ranks. See docs/distributed.md.
The steps: load the processor and model, freeze by ``--tune_mm_*``, optionally wrap in LoRA, patch the
model for packed batches (``qwenvl.patch``), check every data row (bad rows stop the run naming the file and
row, or are skipped with ``--skip_bad_samples``), pack, train with ``QwenVLTrainer`` (per-component learning
rates, trainable report), save the model and processor.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from qwenvl.options import InvalidOption, PatchOptions, current_names
from qwenvl.packing import CONVENTIONS
from qwenvl.train.data import map_style_rows, skip_bad_samples
from qwenvl.train.streaming import streaming_problem, streaming_rows

__all__ = ["ModelArguments", "DataArguments", "main", "run"]

logger = logging.getLogger("qwenvl.train")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Model directory (or hub id). Default: the tiny Qwen2.5-VL shipped in qwenvl.fixtures."},
    )
    tune_mm_vision: bool = field(default=False, metadata={"help": "Train the vision tower (not the projector)."})
    tune_mm_mlp: bool = field(default=True, metadata={"help": "Train the projector ('*merger*')."})
    tune_mm_llm: bool = field(default=True, metadata={"help": "Train the language model and lm_head."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model (PEFT)."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})


@dataclass
class DataArguments:
    data_path: Optional[str] = field(
        default=None,
        # argparse %-formats help text: a literal percent sign is written %%.
        metadata={"help": "Data file(s): 'a.json,b.jsonl%%50' (%%N samples N percent). Default: the demo data."},
    )
    model_max_length: int = field(default=4096, metadata={"help": "Most tokens per sample, vision tokens included."})
    packing: bool = field(default=True, metadata={"help": "Pack samples into rows (--packing False: padded batches)."})
    pack_budget: Optional[int] = field(default=None, metadata={"help": "Tokens per packed row. Default: model_max_length."})
    pack_shards: Optional[int] = field(
        default=None,
        metadata={
            "help": "Pack rows for this many data-parallel ranks, each from its own shard of the samples, balanced "
            "by tokens. Default: the number of processes. One process with --pack_shards N and N times the "
            "gradient accumulation trains on the same rows in every step as N processes."
        },
    )
    packing_convention: str = field(
        default="upstream",
        metadata={"help": "How a packed row tells the model where samples start: " + ", ".join(CONVENTIONS) + " (qwenvl.packing)."},
    )
    pad_to_multiple_of: Optional[int] = field(
        default=None,
        metadata={
            "help": "Pad each packed row with a segment no loss sees to a multiple of this many tokens (e.g. 256): "
            "rows take few distinct lengths, so --compile and fla's kernels compile a bounded number of times."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read --data_path as a stream of shards (.jsonl, .json, .parquet, webdataset-style .tar files; "
            "folders and glob patterns), packed online: shard i is read on rank i %% world, rows are checked and "
            "decoded as they come, and a resumed run goes on exactly where its checkpoint was saved. Needs --max_steps."
        },
    )
    stream_buffer: int = field(
        default=1024, metadata={"help": "Samples the online packer holds before it packs them (--streaming)."}
    )
    skip_bad_samples: bool = field(default=False, metadata={"help": "Skip bad rows (counted) instead of stopping."})
    truncate: bool = field(default=True, metadata={"help": "Cut over-long samples in text after their last image/video."})
    data_check_workers: int = field(default=4, metadata={"help": "Threads for the eager data check."})


_DTYPES = ("float32", "bfloat16", "float16")
_DEFAULT_FLAGS = (("--per_device_train_batch_size", "1"), ("--logging_steps", "1"), ("--report_to", "none"))


def _model_class(model_path: str):
    """The family's entry class, from the model's config alone (nothing heavy loads): a missing directory, a hub
    name that cannot be resolved (unknown, or offline) and an unsupported model type are ``Refused``.
    AutoModelForImageTextToText maps no Qwen3-Omni thinker on 4.57, hence the family's own class."""
    import json


    from qwenvl.families import UnknownFamilyError, get_family

    flag = f"--model_name_or_path {model_path}"
    local = Path(model_path).expanduser()
    if local.exists():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise Refused(f"{flag}: {local} holds no config.json (not a transformers model directory)")
    elif model_path.startswith((".", "/", "~")) or model_path.count("/") != 1 or model_path.endswith("/"):
        raise Refused(f"{flag}: no such directory (and not a hub name of the form 'org/name')")
    else:
        from transformers.utils import cached_file

        hub_log = logging.getLogger("huggingface_hub")
        level = hub_log.level
        hub_log.setLevel(logging.ERROR)  # its retries log a line each; the outcome is said below, once
        try:
            config_file = Path(cached_file(model_path, "config.json"))
        except Exception as exc:  # the hub's errors are long and many-lined: the first line says it
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Refused(
                f"{flag}: not a local directory, and its config.json could not be had from the hub "
                f"(offline, or no such model): {reason}"
            ) from None
        finally:
            hub_log.setLevel(level)
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
    except (KeyError, ValueError) as exc:
        raise Refused(f"{flag}: {config_file} is not a transformers config ({type(exc).__name__}: {exc})") from None
    try:
        return get_family(model_type).entry_type()
    except UnknownFamilyError as exc:
        raise Refused(f"{flag}: {exc}") from None


def _default_model_dir() -> str:
    from qwenvl.fixtures import model_dir

    return str(model_dir("qwen2_5_vl"))


def _default_data_path() -> str:
    from qwenvl.fixtures import demo_data_path

    return str(demo_data_path())


class Refused(ValueError):
    """A bad option: one line for the user and exit status 2, before anything is loaded."""


def _check_args(model_args: ModelArguments, options: PatchOptions, data_args: DataArguments, training_args) -> None:
    import importlib.util

    def one_of(flag: str, value, choices) -> None:
        if value not in choices:
            raise Refused(f"{flag} {value!r} is not one of {', '.join(choices)}")

    one_of("--dtype", model_args.dtype, _DTYPES)
    if options.compile and getattr(training_args, "torch_compile", False):
        raise Refused(
            "--compile and --torch_compile both compile the model: use --compile (each layer and vision block "
            "on its own, packed token dimension dynamic) or --torch_compile, not both"
        )
    one_of("--packing_convention", data_args.packing_convention, CONVENTIONS)
    if data_args.pack_budget is not None and data_args.pack_budget < data_args.model_max_length:
        raise Refused(
            f"--pack_budget {data_args.pack_budget} is below --model_max_length {data_args.model_max_length}: "
            "a sample of maximal length would not fit a row"
        )
    if data_args.pack_shards is not None and data_args.pack_shards < 1:
        raise Refused(f"--pack_shards must be at least 1, got {data_args.pack_shards}")
    if data_args.pad_to_multiple_of is not None and data_args.pad_to_multiple_of < 1:
        raise Refused(f"--pad_to_multiple_of must be a positive number of tokens, got {data_args.pad_to_multiple_of}")
    if model_args.lora_enable and importlib.util.find_spec("peft") is None:
        raise Refused("--lora_enable needs peft, part of the 'train' extra: pip install 'qwenvl[train]'")
    if not (model_args.tune_mm_vision or model_args.tune_mm_mlp or model_args.tune_mm_llm or model_args.lora_enable):
        raise Refused("nothing to train: every --tune_mm_* is False and --lora_enable is off")
    if data_args.packing and training_args.per_device_train_batch_size != 1:
        raise Refused(
            "with packing a batch is one packed row: use --per_device_train_batch_size 1 and --pack_budget for "
            "the tokens per row (or --packing False for padded batches)"
        )
    if data_args.packing and getattr(training_args, "group_by_length", False):  # gone in transformers 5
        raise Refused("--group_by_length groups padded batches; packing already puts samples of similar length in rows")
    if (problem := streaming_problem(data_args, training_args)) is not None:
        raise Refused(problem)


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args,
    *,
    options: PatchOptions = PatchOptions(),
    callbacks=None,
) -> dict:
    """Train and save; returns the Trainer's train metrics plus the data summary (``ranks``: the per-rank
    packing report when rows were packed for several ranks). ``options``: what ``qwenvl.patch`` is given;
    ``callbacks``: extra ``TrainerCallback``s."""
    from qwenvl.data import check_rows
    from qwenvl.data.processor import load_processor, save_processor
    from qwenvl.train.trainer import SaveProcessorCallback

    _check_args(model_args, options, data_args, training_args)
    model_path = model_args.model_name_or_path or _default_model_dir()
    data_path = data_args.data_path or _default_data_path()
    # What can be checked without the model, before it loads: its config, and every row's structure and media.
    model_class = _model_class(model_path)
    if data_args.streaming:  # the files are found and listed now; their rows are checked as they are read
        from qwenvl.data.shards import open_shards

        open_shards(data_path)
    else:
        check_rows(data_path, seed=training_args.seed, skip_bad_samples=data_args.skip_bad_samples)
    processor = load_processor(model_path)
    model = _load_model(model_class, model_path, model_args)
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs or {"use_reentrant": False}
    # Our collators build exactly the model's inputs; the Trainer's column filter would only get in the way.
    training_args.remove_unused_columns = False

    skip_bad = skip_bad_samples(processor, data_args)
    rows = streaming_rows if data_args.streaming else map_style_rows
    train_dataset, collator, summary = rows(data_path, processor, model, data_args, training_args, skip_bad)
    callbacks = [*(callbacks or []), SaveProcessorCallback(processor, model_path)]
    trainer, result = _train(model, train_dataset, collator, training_args, options=options, callbacks=callbacks)
    if trainer.is_world_process_zero():
        save_processor(processor, model_path, training_args.output_dir)
    if data_args.streaming:
        summary.update(data=train_dataset.summary(), fill_ratio=train_dataset.fill_ratio, skipped=train_dataset.skipped_rows)
    summary["skipped_in_training"] = trainer.skipped_in_training
    if trainer.skipped_in_training:
        logger.warning("qwenvl train: %d samples failed to decode in training and were skipped", trainer.skipped_in_training)
    return {**result.metrics, **summary}


def _load_model(model_class, model_path: str, model_args: ModelArguments):
    """The model in ``--dtype``, frozen by ``--tune_mm_*``, wrapped in LoRA with ``--lora_enable``."""
    import torch

    from qwenvl.train.tuning import add_lora, freeze

    model = model_class.from_pretrained(model_path, dtype=getattr(torch, model_args.dtype))
    freeze(model, model_args)
    if model_args.lora_enable:
        model = add_lora(model, model_args)
    return model


def _train(model, train_dataset, collator, training_args, *, options: PatchOptions, callbacks: list):
    """Train the model, patched with ``options`` for the run, with ``QwenVLTrainer`` and save it to
    ``--output_dir``; returns the trainer and ``train``'s result."""
    import qwenvl
    from qwenvl.train.trainer import QwenVLTrainer

    with qwenvl.patch(model, options=options):
        trainer = QwenVLTrainer(
            model=model, args=training_args, train_dataset=train_dataset, data_collator=collator, callbacks=callbacks
        )
        try:
            result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
            trainer.save_model(training_args.output_dir)
        finally:
            if trainer.vision_dummy is not None:
                trainer.vision_dummy.remove()
    return trainer, result


def _missing_train_extra() -> str | None:
    """Why ``qwenvl train`` cannot start here (transformers' Trainer needs accelerate), or ``None``."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        return None
    return (
        "qwenvl train needs the 'train' extra (accelerate is not installed): "
        "pip install 'qwenvl[train]' (from a checkout: pip install -e '.[train]')"
    )


def main(argv: list[str] | None = None) -> int:
    if (missing := _missing_train_extra()) is not None:
        print(f"qwenvl train: error: {missing}", file=sys.stderr)
        return 2
    from transformers import HfArgumentParser

    from qwenvl.train.argument import TrainingArguments

    parser = HfArgumentParser((ModelArguments, PatchOptions, DataArguments, TrainingArguments), prog="qwenvl train")
    argv = current_names("train", sys.argv[1:] if argv is None else argv)
    if not _given(argv, "--output_dir") and "-h" not in argv and "--help" not in argv:
        parser.error("the following arguments are required: --output_dir")
    # Defaults that differ from transformers': a packed batch is one row; log every step; no trackers.
    for flag, value in _DEFAULT_FLAGS:
        if not _given(argv, flag):
            argv = [*argv, flag, value]
    try:
        model_args, options, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except InvalidOption as exc:
        print(f"qwenvl train: error: {exc.flag()}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a value the dataclasses refuse (ours, or TrainingArguments' own checks)
        print(f"qwenvl train: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from qwenvl.data import BadSampleError, DataFileError

    try:
        metrics = run(model_args, data_args, training_args, options=options)
    except (Refused, BadSampleError, DataFileError, FileNotFoundError) as exc:
        print(f"qwenvl train: error: {exc}", file=sys.stderr)
        if isinstance(exc, BadSampleError):
            print("qwenvl train: fix the row, or pass --skip_bad_samples to leave bad rows out", file=sys.stderr)
        return 2
    if training_args.process_index != 0:
        return 0
    print(f"qwenvl train: done; model and processor saved to {Path(training_args.output_dir).resolve()}")
    for key in ("data", "packing"):
        if key in metrics:
            print(f"  {key}: {metrics[key]}")
    if metrics.get("skipped_in_training"):
        print(f"  skipped in training: {metrics['skipped_in_training']} samples failed to decode (named in the log)")
    return 0


def _given(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` is on the command line in either spelling HfArgumentParser accepts (_ or -)."""
    spellings = {flag, "--" + flag[2:].replace("_", "-")}
    return any(a.split("=", 1)[0] in spellings for a in argv)


if __name__ == "__main__":
    sys.exit(main())
