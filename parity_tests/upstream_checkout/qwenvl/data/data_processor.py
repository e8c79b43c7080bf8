import json
import os
from dataclasses import dataclass

import torch
import transformers
from PIL import Image
from torch.utils.data import Dataset

from . import data_list
from .rope2d import get_rope_index

IGNORE_INDEX = -100


class LazySupervisedDataset(Dataset):
    def __init__(self, processor, data_args):
        self.processor = processor
        self.data_args = data_args
        self.rows = []
        for config in data_list(data_args.dataset_use.split(",")):
            with open(config["annotation_path"]) as f:
                rows = json.load(f)
            for row in rows:
                row["data_path"] = config["data_path"]
            self.rows.extend(rows)
        tokenizer = processor.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.reply_marker = tokenizer.encode("<|im_start|>assistant\n")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        images = [row["image"]] if isinstance(row.get("image"), str) else row.get("image", [])
        messages = []
        for turn in row["conversations"]:
            role = "user" if turn["from"] == "human" else "assistant"
            text = turn["value"].replace("<image>\n", "").replace("<image>", "")
            content = [{"type": "image"} for _ in range(turn["value"].count("<image>"))]
            messages.append({"role": role, "content": content + [{"type": "text", "text": text}]})
        text = self.processor.apply_chat_template(messages, tokenize=False)
        pil = [Image.open(os.path.join(row["data_path"], p)).convert("RGB") for p in images] or None
        out = self.processor(text=[text], images=pil, return_tensors="pt")
        input_ids = out["input_ids"][0]
        labels = input_ids.clone()
        ids, n = input_ids.tolist(), len(self.reply_marker)
        starts = [j + n for j in range(len(ids) - n + 1) if ids[j : j + n] == self.reply_marker]
        labels[: starts[-1]] = IGNORE_INDEX  # train on the last reply only
        position_ids = get_rope_index(
            self.processor.image_processor.merge_size,
            input_ids,
            out.get("image_grid_thw", []),
            image_token_id=self.image_token_id,
            vision_start_token_id=self.vision_start_token_id,
        )
        item = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if pil:
            item["pixel_values"] = out["pixel_values"]
            item["image_grid_thw"] = out["image_grid_thw"]
        return item


def _vision(instances):
    batch = {}
    with_images = [x for x in instances if "pixel_values" in x]
    if with_images:
        batch["pixel_values"] = torch.cat([x["pixel_values"] for x in with_images])
        batch["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in with_images])
    return batch


@dataclass
class DataCollatorForSupervisedDataset:
    tokenizer: transformers.PreTrainedTokenizer

    def __call__(self, instances):
        longest = max(len(x["input_ids"]) for x in instances)

        def pad(t, value):
            return torch.nn.functional.pad(t, (0, longest - t.shape[-1]), value=value)

        input_ids = torch.stack([pad(x["input_ids"], self.tokenizer.pad_token_id) for x in instances])
        batch = {
            "input_ids": input_ids,
            "labels": torch.stack([pad(x["labels"], IGNORE_INDEX) for x in instances]),
            "attention_mask": torch.stack([pad(torch.ones_like(x["input_ids"]), 0) for x in instances]),
            "position_ids": torch.cat([pad(x["position_ids"], 1) for x in instances], dim=1),
        }
        return {**batch, **_vision(instances)}


@dataclass
class FlattenedDataCollatorForSupervisedDataset(DataCollatorForSupervisedDataset):
    """All samples in one row; attention_mask carries the cumulative sequence lengths."""

    def __call__(self, instances):
        lengths = torch.tensor([len(x["input_ids"]) for x in instances])
        batch = {
            "input_ids": torch.cat([x["input_ids"] for x in instances])[None],
            "labels": torch.cat([x["labels"] for x in instances])[None],
            "position_ids": torch.cat([x["position_ids"] for x in instances], dim=2),
            "attention_mask": torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)]),
        }
        return {**batch, **_vision(instances)}


def make_supervised_data_module(processor, data_args):
    train_dataset = LazySupervisedDataset(processor, data_args)
    flat = data_args.data_flatten or data_args.data_packing
    collator = (FlattenedDataCollatorForSupervisedDataset if flat else DataCollatorForSupervisedDataset)(processor.tokenizer)
    return dict(train_dataset=train_dataset, eval_dataset=None, data_collator=collator)
