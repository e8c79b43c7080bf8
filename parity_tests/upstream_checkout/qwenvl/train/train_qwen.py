"""Fine-tune a Qwen-VL model: the calling pattern of the upstream script, for qwenvl's drop-in test."""

import os
import pathlib
import sys
from pathlib import Path

import torch
import transformers

project_root = Path(__file__).parent.parent.parent
sys.path.append(str(project_root))

from trainer import replace_qwen2_vl_attention_class  # noqa: E402

from transformers import Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration  # noqa: E402
from qwenvl.data.data_processor import make_supervised_data_module  # noqa: E402
from qwenvl.train.argument import ModelArguments, DataArguments, TrainingArguments  # noqa: E402
from transformers import AutoProcessor, Trainer  # noqa: E402


def load_processor(path):
    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError:  # transformers 5.x wants torchvision for the video processor; the CPU CI has none
        from qwenvl.data.processor import load_processor as images_and_text

        return images_and_text(path)


def rank0():
    return int(os.environ.get("RANK", "0")) == 0


def set_model(model_args, model):
    for _, p in model.visual.named_parameters():
        p.requires_grad = model_args.tune_mm_vision
    for _, p in model.visual.merger.named_parameters():
        p.requires_grad = model_args.tune_mm_mlp
    for _, p in model.language_model.named_parameters():
        p.requires_grad = model_args.tune_mm_llm
    model.lm_head.requires_grad = model_args.tune_mm_llm


def train():
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    path = model_args.model_name_or_path
    cls = Qwen2_5_VLForConditionalGeneration if "qwen2_5" in path.lower() else Qwen2VLForConditionalGeneration
    model = cls.from_pretrained(path, cache_dir=training_args.cache_dir, dtype=torch.float32)
    processor = load_processor(path)
    if data_args.data_flatten or data_args.data_packing:
        replace_qwen2_vl_attention_class()
    model.config.use_cache = False
    set_model(model_args, model)
    if rank0():
        model.visual.print_trainable_parameters()
        model.model.print_trainable_parameters()
    data_module = make_supervised_data_module(processor, data_args=data_args)
    trainer = Trainer(model=model, processing_class=processor.tokenizer, args=training_args, **data_module)
    if list(pathlib.Path(training_args.output_dir).glob("checkpoint-*")):
        trainer.train(resume_from_checkpoint=True)
    else:
        trainer.train()
    trainer.save_state()
    model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    train()
