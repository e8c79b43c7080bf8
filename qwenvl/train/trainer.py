"""``QwenVLTrainer``: transformers' ``Trainer`` with per-component learning rates that are never silently wrong.

Importing this module changes nothing: no patching, no reassignment of ``transformers.Trainer`` methods.
Only instances of ``QwenVLTrainer`` build their optimizer from :func:`qwenvl.train.optim.build_param_groups`
(:mod:`qwenvl.train.component_optimizer`); ``QwenVLTrainer.train`` patches the model for packed batches for its
duration when no qwenvl patch covers it (reverted when it ends), and a packed batch that reaches an unpatched
model is refused in one line (:mod:`qwenvl.train.packed_patch`).

Where per-component learning rates cannot take effect, it raises instead of training with one learning rate:

- a DeepSpeed config with an ``optimizer`` block (transformers then builds DeepSpeed's optimizer and never
  calls ``create_optimizer``) or a ``scheduler`` block (DeepSpeed's schedulers set one learning rate for every
  group, erasing the ratios): :mod:`qwenvl.train.deepspeed_config`;
- an ``--optim`` that builds its own parameter groups (GaLore, LOMO, layer-wise, optimizer factories).

It also resumes checkpoints that transformers' own resume leaves half loaded (see ``_load_from_checkpoint`` and
:mod:`qwenvl.train.checkpoint`).

On a ``qwenvl.data.StreamingDataset`` it records the stream's position with every batch it trains on, saves it in
each checkpoint (one JSON file per rank) and, resuming, puts the stream back there instead of skipping batches: the
resumed run trains on exactly the rows the uninterrupted one would have. Its DataLoader is built here, without
accelerate's re-sharding of iterable datasets (each rank already reads its own shards).

Under a data-parallel launcher (torchrun / ``accelerate launch``; DDP, FSDP2, DeepSpeed) it adds what
``qwenvl.train.distributed`` describes: the vision dummy pass, so that a rank without images takes part in
the vision tower's backward (on under a launcher, or with ``dummy_vision_pass=True``); and,
for a ``PackedDataset`` packed for several ranks, a sampler that hands each rank its own rows. Asking for FSDP
where accelerate does not turn it on (on CPU it never does) is an error, not a silent DDP run.

The pieces it is built from stay importable from here: ``check_deepspeed_config``,
``create_component_optimizer``, ``load_optimizer_and_scheduler_adopting``, ``UnpatchedPackedBatch``, and
``replace_qwen2_vl_attention_class`` (upstream's entry point, :mod:`qwenvl.train.upstream`).
"""

from __future__ import annotations

import logging
import os

import torch
import transformers
from transformers import TrainerCallback

from qwenvl.data.collators import STREAM_KEY
from qwenvl.packing import SKIPPED_KEY
from qwenvl.train.checkpoint import (
    _checkpoint_keys,
    _fill_missing_optimizer_state,
    load_optimizer_and_scheduler_adopting,
    load_stream_state,
    save_stream_state,
)
from qwenvl.train.component_optimizer import create_component_optimizer
from qwenvl.train.deepspeed_config import check_deepspeed_config
from qwenvl.train.distributed import VisionDummy, dummy_vision_pass_wanted, vision_modalities
from qwenvl.train.optim import component_lrs_given
from qwenvl.train.packed_patch import UnpatchedPackedBatch, _patch_for_packed_rows, _refuse_unpatched_packed
from qwenvl.train.report import trainable_report
from qwenvl.train.upstream import replace_qwen2_vl_attention_class

__all__ = [
    "QwenVLTrainer",
    "SaveProcessorCallback",
    "UnpatchedPackedBatch",
    "check_deepspeed_config",
    "create_component_optimizer",
    "replace_qwen2_vl_attention_class",
]

logger = logging.getLogger(__name__)


class SaveProcessorCallback(TrainerCallback):
    """Put the processor in every ``checkpoint-N/`` too, so each one reloads with ``AutoProcessor`` (the Trainer
    saves the model, optimizer and state there; ``save_processor`` keeps the model directory's own video
    processor where this machine cannot build one)."""

    def __init__(self, processor, model_path):
        self.processor, self.model_path = processor, model_path

    def on_save(self, args, state, control, **kwargs):
        from qwenvl.data.processor import save_processor

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            save_processor(self.processor, self.model_path, folder)


def _adopt_vision_preamble(collator, model) -> None:
    """A ``PackedCollator`` built without the model computes its vision tower's inputs from now on."""
    from qwenvl.data import PackedCollator
    from qwenvl.data.vision_meta import VisionPreamble

    if isinstance(collator, PackedCollator) and collator.vision is None and model is not None:
        collator.vision = VisionPreamble.of(model)


class QwenVLTrainer(transformers.Trainer):
    """``transformers.Trainer`` with one optimizer group per (component, decay) pair.

    Reads ``args.mm_projector_lr`` and ``args.vision_tower_lr`` (see :class:`qwenvl.train.argument.TrainingArguments`;
    plain ``transformers.TrainingArguments`` work too and give base-lr groups). Prints the trainable-parameter
    report when training begins (rank 0 only).

    ``vision_dummy`` is the :class:`qwenvl.train.distributed.VisionDummy` on the model (``None`` when off): it
    runs a vision pass per modality of the training set (``vision_modalities``; images when it cannot tell)
    in every forward that lacks one.
    """

    def __init__(self, model=None, args=None, *more, **kwargs):
        if args is not None:
            # transformers never calls create_optimizer when DeepSpeed owns the optimizer: fail now, not never.
            check_deepspeed_config(
                getattr(args, "hf_deepspeed_config", None) or getattr(args, "deepspeed", None) or None, args
            )
        if args is not None and args.dataloader_pin_memory:
            args.accelerator_config.non_blocking = True  # pinned batches reach the GPU without a host sync
        super().__init__(model, args, *more, **kwargs)
        _adopt_vision_preamble(self.data_collator, self.model)
        # A config given to `accelerate launch` instead of --deepspeed only shows up on the accelerator.
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and getattr(self.args, "hf_deepspeed_config", None) is None:
            check_deepspeed_config(getattr(plugin, "hf_ds_config", None) or plugin, self.args)
        fsdp_on = self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False)
        if getattr(self.args, "fsdp", None) and not fsdp_on:
            raise ValueError(
                f"--fsdp was given but accelerate did not turn FSDP on (distributed type "
                f"{self.accelerator.distributed_type}): it only does for multi-GPU-like devices, never on CPU. Launch "
                "with torchrun or accelerate launch on GPUs, or drop --fsdp to train with DDP."
            )
        self.vision_dummy = None
        self.skipped_in_training = 0  # samples that failed to decode in a worker (skip_bad_samples)
        if dummy_vision_pass_wanted(self.args):
            modalities = vision_modalities(self.train_dataset) or ("image",)
            self.vision_dummy = VisionDummy(self.model, modalities)
            logger.info(
                "vision dummy pass on (%d processes): every forward without them runs the vision tower for %s",
                self.args.world_size,
                " and ".join(modalities),
            )
        if self.optimizer is not None and (lrs := component_lrs_given(self.args)):
            logger.warning(
                "An optimizer was passed to QwenVLTrainer, so %s are ignored: its own parameter groups are used. "
                "Build its groups with qwenvl.train.optim.build_param_groups to get per-component learning rates.",
                " and ".join(lrs),
            )

    def train(self, *args, **kwargs):
        """``Trainer.train``, with the trainable-parameter report printed first (rank 0); training on packed rows
        (a ``PackedDataset`` or the ``PackedCollator``) while nothing is patched, the model is patched for the
        duration (``qwenvl.patch(model)``, reverted when training ends)."""
        if self.is_world_process_zero():
            # printed, not logged: a plain script has logging unconfigured; before the progress bar exists
            print(trainable_report(self.model).format(), flush=True)
        handle = _patch_for_packed_rows(self.model, self.train_dataset, self.data_collator)
        skip = self.args.ignore_data_skip
        try:
            if self._streaming:
                # the stream is put back where the checkpoint was saved: transformers must not skip batches again
                self._resume_stream(kwargs.get("resume_from_checkpoint", args[0] if args else None))
                self.args.ignore_data_skip = True
            return super().train(*args, **kwargs)
        finally:
            self.args.ignore_data_skip = skip
            if handle is not None:
                handle.revert()

    @property
    def _streaming(self) -> bool:
        from qwenvl.data.streaming import StreamingDataset

        return isinstance(self.train_dataset, StreamingDataset)

    def _resume_stream(self, checkpoint) -> None:
        if checkpoint is None or checkpoint is False:
            return
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                return  # transformers says there is none, in its own words
        load_stream_state(checkpoint, self.train_dataset, self.args.process_index)
        logger.info("the stream goes on from %s: %s", checkpoint, self.train_dataset.summary())

    def get_train_dataloader(self):
        """transformers' loader; for a ``StreamingDataset`` a plain ``DataLoader`` in order, one stream per rank
        (accelerate would re-shard an iterable dataset across ranks, or read it on rank 0 only and dispatch)."""
        if not self._streaming:
            return super().get_train_dataloader()
        args = self.args
        if args.dataloader_persistent_workers:
            raise ValueError(
                "a streaming dataset needs fresh DataLoader workers for each pass over the loader: drop "
                "--dataloader_persistent_workers"
            )
        workers = args.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory,
            multiprocessing_context=getattr(args, "dataloader_multiprocessing_context", None) if workers else None,
            prefetch_factor=args.dataloader_prefetch_factor if workers else None,
        )

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        super()._save_checkpoint(model, trial, *args, **kwargs)
        if self._streaming:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            save_stream_state(folder, self.train_dataset, self.args.process_index)

    def log(self, logs, *args, **kwargs):
        if self._streaming and "loss" in logs:
            logs["fill_ratio"] = round(self.train_dataset.fill_ratio, 4)
        return super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        """``Trainer.evaluate``; on packed rows while nothing is patched, the model is patched for the duration,
        as in ``train``."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        handle = _patch_for_packed_rows(self.model, dataset, self.data_collator)
        try:
            return super().evaluate(eval_dataset, *args, **kwargs)
        finally:
            if handle is not None:
                handle.revert()

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop(SKIPPED_KEY, None)
        inputs.pop(STREAM_KEY, None)
        _refuse_unpatched_packed(self.model, inputs)
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        """A ``PackedDataset`` packed for several ranks keeps each step's rows together (``StepSampler``), so
        accelerate's round-robin sharding hands rank ``r`` its own rows; anything else: transformers' sampler."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        shards = getattr(dataset, "shards", 1)
        if shards > 1 and hasattr(dataset, "step_sampler"):
            world = self.args.world_size
            if world > 1 and world != shards:
                logger.warning(
                    "the rows were packed for %d ranks but %d processes train: every row is still used once per "
                    "epoch, but not on the rank it was packed for (pack for %d shards)",
                    shards,
                    world,
                    world,
                )
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return dataset.step_sampler(seed=seed)
        return super()._get_train_sampler(train_dataset)

    def training_step(self, model, inputs, *args, **kwargs):
        self._count_skipped(inputs)
        for tag in inputs.pop(STREAM_KEY, ()):  # trained on: the stream's position moves past this row
            if self._streaming:
                self.train_dataset.record(tag)
        _refuse_unpatched_packed(self.model, inputs)
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.vision_dummy is not None and self.accelerator.sync_gradients:
            self._drop_untouched_vision_grads()
        return loss

    def _count_skipped(self, inputs) -> None:
        """Samples that failed to decode in a worker and were skipped (``--skip_bad_samples``): counted
        (``skipped_in_training``) and each named in the log; the key never reaches the model."""
        for name in inputs.pop(SKIPPED_KEY, ()):
            self.skipped_in_training += 1
            logger.warning("skipped a sample that failed to decode (%d so far): %s", self.skipped_in_training, name)

    def _drop_untouched_vision_grads(self) -> None:
        """After the last backward of an optimizer step: when no rank had a real image or video, the vision
        gradients are the dummy pass's zeros; set them to ``None`` so the optimizer skips those parameters, as
        it does on one process (and as DDP leaves a parameter no rank used). Before clipping, so the gradient
        norm sees the same tensors as a single-process run. DeepSpeed keeps its own gradient buffers: skipped."""
        real = self.vision_dummy.take_real_count()
        if self.is_deepspeed_enabled:
            return
        if self.args.world_size > 1:
            count = torch.tensor([real], device=self.args.device)
            real = int(self.accelerator.reduce(count, reduction="sum").item())
        if real == 0:
            for param in self.vision_dummy.parameters():
                param.grad = None

    def create_optimizer(self, model=None):
        """Build the optimizer ``args.optim`` names over :func:`build_param_groups` (:func:`create_component_optimizer`).

        Callable as ``create_optimizer()`` (transformers 4.57 - 5.2, and the usual path of later releases) and
        ``create_optimizer(model)`` (5.3+ passes the prepared model on its FSDP path). Keeps ``self.optimizer``
        if one is set already.
        """
        return create_component_optimizer(self, model, fallback=self._upstream_create_optimizer)

    def _upstream_create_optimizer(self, model):
        if model is None or model is self.model:
            return super().create_optimizer()
        return super().create_optimizer(model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        return load_optimizer_and_scheduler_adopting(self, checkpoint, super()._load_optimizer_and_scheduler)

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.is_fsdp_enabled and self.optimizer is not None:
            _fill_missing_optimizer_state(self.optimizer)
        return super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # save_pretrained writes Qwen2-VL / Qwen2.5-VL weights under the hub's names (`visual.*`, `model.layers.*`)
        # while the model's own are `model.visual.*`, `model.language_model.layers.*`. transformers' resume
        # (4.57 through 5.24) loads the file with load_state_dict(strict=False): every renamed weight stays at its
        # freshly initialised value, behind a warning. from_pretrained knows the renaming, so load through it.
        target = self.model if model is None else model
        keys = None
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if isinstance(target, transformers.PreTrainedModel) and not sharded:
            keys = _checkpoint_keys(resume_from_checkpoint)
        if keys is None or keys == set(target.state_dict()):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading %s with from_pretrained: its weight names are not the model's.", resume_from_checkpoint)
        dtype = next(target.parameters()).dtype
        loaded = type(target).from_pretrained(
            resume_from_checkpoint, config=target.config, dtype=dtype, attn_implementation="eager"
        )
        target.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
