"""Pack samples with images and train a few steps with ``qwenvl.patch`` and ``QwenVLTrainer``, every family.

Runs on a CPU in seconds with the tiny random models of ``qwenvl.fixtures`` (no hub access):

    python -m pip install -e '.[train]'
    python examples/train_packed_images.py --steps 3

What a packed training row is (the upstream Qwen-VL convention)::

    sample a: text <vision_start> <image_pad> x n <vision_end> text     labels: -100 on the prompt and image
    sample b: text text text
    input_ids      (1, T)        a ... | b ...
    attention_mask int32 (S + 1,) cu_seqlens [0, len(a), len(a) + len(b)]
    position_ids   (3, 1, T)     each sample's own mrope rows (the model's get_rope_index on it alone)
    labels         (1, T)        each sample's first label -100: no token predicts across a boundary
    pixel_values, image_grid_thw the samples' images concatenated in sample order

Before training, each family's packed loss is checked against the token mean of the samples' losses run
alone, unpatched, the ordinary way: a padded-free batch of one with ``mm_token_type_ids`` where the release
takes it (transformers >= 5.3 needs it to place the image tokens' positions; without it Qwen2.5-VL silently
gets other positions and Qwen3-VL raises).
"""

from __future__ import annotations

import argparse
import inspect
import tempfile

import torch

import qwenvl
from qwenvl.families import FAMILIES
from qwenvl.fixtures import tiny_model
from qwenvl.packing import mask_boundary_labels
from qwenvl.positions import mm_token_type_ids
from qwenvl.train.argument import TrainingArguments
from qwenvl.train.trainer import QwenVLTrainer
from qwenvl.verify.batches import SampleSpec, make_sample, pack

SPECS = (SampleSpec(text=10, image=(4, 4)), SampleSpec(text=14), SampleSpec(text=6, image=(2, 6)))


def family_of_model_config(config):
    from qwenvl.families import get_family

    return get_family(config.model_type)


def _labels(config, input_ids_1T: torch.Tensor) -> torch.Tensor:
    """Train on text tokens only: vision tokens (and their start/end markers) get -100."""
    keys = family_of_model_config(config).tokens
    names = (keys.image, keys.video, keys.start, keys.end, keys.video_start, keys.video_end)
    vision = sorted({getattr(config, name) for name in names if name is not None})
    labels = input_ids_1T.clone()
    labels[torch.isin(labels, torch.tensor(vision))] = -100
    return labels


def packed_rows(model, n_rows: int, seed: int = 0) -> list[dict]:
    """``n_rows`` packed training rows of three samples each, ready for the model."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        batch = pack(model, [make_sample(model.config, spec, generator=gen) for spec in SPECS])
        inputs = batch.model_inputs("upstream")
        labels = _labels(model.config, batch.input_ids)
        inputs["labels"] = mask_boundary_labels(labels[0], batch.cu_seqlens)[None]
        rows.append({"samples": batch.samples, **inputs})
    return rows


def collate_packed(items: list[dict]) -> dict:
    """The Trainer's collator for rows that are already packed: one row per step, model inputs only."""
    if len(items) != 1:
        raise ValueError(f"packed rows are batches already: use per_device_train_batch_size=1, got {len(items)}")
    return {k: v for k, v in items[0].items() if k != "samples"}


def loss_alone(model, row: dict) -> torch.Tensor:
    """Token-mean loss of the row's samples, each run alone and unpatched, the ordinary way."""
    takes_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    total, count = torch.zeros((), dtype=torch.float64), 0
    for sample in row["samples"]:
        ids = sample.input_ids[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": _labels(model.config, ids)}
        if takes_types:
            inputs["mm_token_type_ids"] = mm_token_type_ids(model.config, ids)
        for name in ("pixel_values", "image_grid_thw"):
            if (value := getattr(sample, name)) is not None:
                inputs[name] = value
        n = int((inputs["labels"][:, 1:] != -100).sum())
        total += model(**inputs).loss.double() * n
        count += n
    return total / count


def train_family(family: str, steps: int, output_dir: str) -> list[float]:
    model = tiny_model(family)
    rows = packed_rows(model, steps)
    expected = loss_alone(model, rows[0])
    with qwenvl.patch(model):
        packed = model(**collate_packed(rows[:1])).loss.double()
        if not torch.allclose(packed, expected, rtol=1e-5, atol=1e-6):
            raise SystemExit(f"{family}: packed loss {packed.item():.6f} != samples alone {expected.item():.6f}")
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=1,
            learning_rate=1e-3,
            mm_projector_lr=1e-3,
            vision_tower_lr=1e-4,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = QwenVLTrainer(model=model.train(), args=args, train_dataset=rows, data_collator=collate_packed)
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="default: every family")
    args = parser.parse_args(argv)
    for family in args.family or FAMILIES:
        with tempfile.TemporaryDirectory() as out:
            losses = train_family(family, args.steps, out)
        if len(losses) != args.steps or not all(torch.isfinite(torch.tensor(losses))):
            raise SystemExit(f"{family}: expected {args.steps} finite losses, got {losses}")
        print(f"{family}: packed loss = samples alone; {args.steps} steps, losses {[round(x, 4) for x in losses]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
