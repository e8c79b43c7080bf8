"""``QwenVLTrainer``: transformers' ``Trainer`` with per-component learning rates that are never silently wrong.

Importing this module changes nothing: no patching, no reassignment of ``transformers.Trainer`` methods.
Only instances of ``QwenVLTrainer`` build their optimizer from :func:`qwenvl.train.optim.build_param_groups`;
``QwenVLTrainer.train`` patches the model for packed batches for its duration when no qwenvl patch covers it
(reverted when it ends), and a packed batch that reaches an unpatched model is refused in one line.

Where per-component learning rates cannot take effect, it raises instead of training with one learning rate:

- a DeepSpeed config with an ``optimizer`` block (transformers then builds DeepSpeed's optimizer and never
  calls ``create_optimizer``) or a ``scheduler`` block (DeepSpeed's schedulers set one learning rate for every
  group, erasing the ratios);
- an ``--optim`` that builds its own parameter groups (GaLore, LOMO, layer-wise, optimizer factories).

It also resumes checkpoints that transformers' own resume leaves half loaded (see ``_load_from_checkpoint``).

Under a data-parallel launcher (torchrun / ``accelerate launch``; DDP, FSDP2, DeepSpeed) it adds what
``qwenvl.train.distributed`` describes: the vision dummy pass, so that a rank without images takes part in
the vision tower's backward (on under a launcher, or with ``dummy_vision_pass=True``); and,
for a ``PackedDataset`` packed for several ranks, a sampler that hands each rank its own rows. Asking for FSDP
where accelerate does not turn it on (on CPU it never does) is an error, not a silent DDP run.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os

import torch
import transformers
import transformers.trainer
from transformers import TrainerCallback

from qwenvl.train.distributed import VisionDummy, dummy_vision_pass_wanted, vision_modalities
from qwenvl.train.optim import OptimizerStateMismatch, adopt_optimizer_state, build_param_groups
from qwenvl.train.report import trainable_report

__all__ = [
    "QwenVLTrainer",
    "SaveProcessorCallback",
    "check_deepspeed_config",
    "create_component_optimizer",
    "replace_qwen2_vl_attention_class",
]

logger = logging.getLogger(__name__)

_PER_COMPONENT = ("mm_projector_lr", "vision_tower_lr")


_WARNED_PLAIN_TRAINER = False


def replace_qwen2_vl_attention_class(backend: str = "auto"):
    """Upstream-compatible entry point: patch all supported Qwen-VL families for packed batches.

    Attention only. Upstream's module also made every ``Trainer`` honour ``mm_projector_lr`` /
    ``vision_tower_lr``; a plain ``transformers.Trainer`` ignores them, so this says so once (loudly) unless
    :func:`qwenvl.train.upstream.install` has made every Trainer build qwenvl's groups.
    """
    global _WARNED_PLAIN_TRAINER
    from qwenvl.patches import patch

    if not getattr(transformers.Trainer.create_optimizer, "__qwenvl_upstream__", False) and not _WARNED_PLAIN_TRAINER:
        _WARNED_PLAIN_TRAINER = True
        logger.warning(
            "replace_qwen2_vl_attention_class patches attention only: a plain transformers.Trainer ignores "
            "mm_projector_lr and vision_tower_lr. Train with QwenVLTrainer, or call qwenvl.train.upstream.install() "
            "(upstream's train_qwen.py: docs/migration.md)"
        )
    return patch(backend=backend)


def _per_component_lrs(args) -> dict[str, float]:
    """The per-component learning rates set on ``args`` (plain transformers arguments have none)."""
    return {name: value for name in _PER_COMPONENT if (value := getattr(args, name, None)) is not None}


def _load_deepspeed_config(ds_config) -> dict | None:
    if ds_config is None:
        return None
    if isinstance(ds_config, dict):
        return ds_config
    # HfDeepSpeedConfig / HfTrainerDeepSpeedConfig keep the parsed dict in `.config`; accelerate's
    # DeepSpeedPlugin in `.deepspeed_config`.
    for attr in ("config", "deepspeed_config"):
        if isinstance(value := getattr(ds_config, attr, None), dict):
            return value
    if isinstance(ds_config, (str, os.PathLike)):
        path = os.fspath(ds_config)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        try:
            # transformers also accepts the JSON base64-encoded on the command line.
            return json.loads(base64.urlsafe_b64decode(path).decode("utf-8"))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ValueError(f"DeepSpeed config {path!r} is neither an existing file nor base64-encoded JSON") from None
    raise TypeError(f"cannot read a DeepSpeed config from {type(ds_config).__name__}")


def check_deepspeed_config(ds_config, args) -> bool:
    """Refuse a DeepSpeed config that would silently drop ``args``' per-component learning rates.

    Args:
        ds_config: a dict, a path to a JSON file, base64-encoded JSON, an ``HfDeepSpeedConfig`` or accelerate's
            ``DeepSpeedPlugin``; ``None`` for no DeepSpeed.
        args: training arguments; ``mm_projector_lr`` / ``vision_tower_lr`` are read if present.

    Returns:
        Whether DeepSpeed builds the optimizer (the config has an ``optimizer`` block).

    Raises:
        ValueError: per-component learning rates are set and the config has an ``optimizer`` or ``scheduler``
            block.
    """
    config = _load_deepspeed_config(ds_config)
    if not config:
        return False
    blocks = [block for block in ("optimizer", "scheduler") if block in config]
    if not blocks:
        return False
    lrs = _per_component_lrs(args)
    if lrs:
        settings = ", ".join(f"{name}={value}" for name, value in lrs.items())
        reasons = []
        if "optimizer" in blocks:
            reasons.append(
                "its 'optimizer' block makes transformers build DeepSpeed's optimizer with one learning rate for "
                "every parameter and never call create_optimizer"
            )
        if "scheduler" in blocks:
            reasons.append(
                "its 'scheduler' block makes DeepSpeed's scheduler set one learning rate for every parameter group"
            )
        raise ValueError(
            f"{settings} cannot take effect with this DeepSpeed config: {'; and '.join(reasons)}. "
            f"Remove the {' and '.join(repr(b) for b in blocks)} block(s) from the DeepSpeed config: the "
            "Hugging Face Trainer then builds the optimizer from --optim, --learning_rate, --weight_decay and "
            "--adam_* (ZeRO still partitions it) with one parameter group per component, and the scheduler from "
            "--lr_scheduler_type / --warmup_steps, which keeps each group's ratio. Or unset "
            f"{' and '.join(lrs)} to train every parameter at one learning rate."
        )
    logger.info(
        "DeepSpeed config defines %s: DeepSpeed builds it, with one learning rate for all parameters "
        "(fine: mm_projector_lr and vision_tower_lr are unset).",
        " and ".join(blocks),
    )
    return "optimizer" in blocks


def _optimizer_factory_check():
    # Optimizer factories (Muon, Dion) arrived in 5.x; older releases have no such thing.
    return getattr(transformers.trainer, "is_optimizer_factory", lambda cls: False)


def _split_by_device_mesh(groups: list[dict]) -> list[dict]:
    """Give parameters on different device meshes their own groups (fused/foreach kernels need one mesh)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return groups
    if not any(isinstance(p, DTensor) for group in groups for p in group["params"]):
        return groups
    split = []
    for group in groups:
        by_mesh: dict = {}
        for p in group["params"]:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        split.extend({**group, "params": params} for params in by_mesh.values())
    return split


def _checkpoint_keys(folder: str) -> set[str] | None:
    """The tensor names of a full-model checkpoint folder, without reading the tensors; ``None`` if unknown."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME

    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return set(f.keys())
    for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return set(json.load(f)["weight_map"])
    return None


def _fill_missing_optimizer_state(optimizer) -> int:
    """Give every parameter of ``optimizer`` a state, as the optimizer itself would create it on its first step.

    A parameter that never had a gradient (the vision tower before the first image: its dummy-pass zeros are
    dropped) has no optimizer state. torch's distributed checkpoint (FSDP2 resume) loads into a fresh optimizer
    whose state it initialises for every parameter, and refuses a checkpoint without those keys ("Missing key in
    checkpoint state_dict: optimizer.state.<name>.step"). One step with zero gradients on those parameters only
    and every learning rate at 0 creates the state without moving anything; its ``step`` counter is then set
    back to 0, so the state is exactly the lazy one (Adam/AdamW: step 0, zero moments) and training goes on as it
    would have. Returns how many parameters got a state.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    missing = [p for group in inner.param_groups for p in group["params"] if not inner.state.get(p)]
    if not missing:
        return 0
    missing_ids = {id(p) for p in missing}
    params = [p for group in inner.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    lrs = [group["lr"] for group in inner.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p) if id(p) in missing_ids else None
        for group in inner.param_groups:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
        inner.step()
    finally:
        for group, lr in zip(inner.param_groups, lrs):
            group["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
    for p in missing:
        step = inner.state.get(p, {}).get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            inner.state[p]["step"] = 0
    return len(missing)


def create_component_optimizer(trainer, model=None, *, fallback):
    """The optimizer ``trainer.args.optim`` names, over :func:`build_param_groups` of ``model`` (default
    ``trainer.model``): what ``QwenVLTrainer.create_optimizer`` and, after ``qwenvl.train.upstream.install()``,
    every ``transformers.Trainer`` build. Keeps ``trainer.optimizer`` if one is set already.

    ``fallback(model)`` builds transformers' own optimizer, for an ``--optim`` that makes its own groups.
    Raises ``ValueError`` wherever the per-component learning rates could not take effect, and
    :class:`qwenvl.train.optim.UnreachedLearningRate` for one set on a component with nothing to train.
    """
    if trainer.optimizer is not None:
        return trainer.optimizer
    opt_model = trainer.model if model is None else model

    if trainer.optimizer_cls_and_kwargs is not None:
        optimizer_cls, optimizer_kwargs = trainer.optimizer_cls_and_kwargs
    else:
        optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, opt_model)
    optimizer_kwargs = dict(optimizer_kwargs)

    builds_own_groups = [key for key in ("params", "model", "optimizer_dict") if key in optimizer_kwargs]
    if builds_own_groups or _optimizer_factory_check()(optimizer_cls):
        if lrs := _per_component_lrs(trainer.args):
            raise ValueError(
                f"--optim {trainer.args.optim} builds its own parameter groups, so {' and '.join(lrs)} cannot be "
                "applied. Use an optimizer that takes parameter groups (e.g. adamw_torch) or unset them."
            )
        return fallback(model)

    flat = [name for name, _ in opt_model.named_parameters() if "_flat_param" in name]
    if flat and _per_component_lrs(trainer.args):
        raise ValueError(
            f"FSDP1 without use_orig_params flattened the parameters into {flat[0]!r}, so "
            f"{' and '.join(_per_component_lrs(trainer.args))} cannot be told apart by name: use FSDP2 "
            "(fsdp_version 2) or use_orig_params=True"
        )
    groups = build_param_groups(
        opt_model,
        lr=trainer.args.learning_rate,
        weight_decay=trainer.args.weight_decay,
        mm_projector_lr=getattr(trainer.args, "mm_projector_lr", None),
        vision_tower_lr=getattr(trainer.args, "vision_tower_lr", None),
        decay_parameter_names=trainer.get_decay_parameter_names(opt_model),
        require_reach=True,
    )
    trainer.optimizer = optimizer_cls(_split_by_device_mesh(groups), **optimizer_kwargs)

    if "bitsandbytes" in str(optimizer_cls) and optimizer_kwargs.get("optim_bits") == 8:
        # As transformers does: 8-bit state for embeddings hurts; keep theirs in 32 bits.
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in opt_model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})

    for group in groups if trainer.is_world_process_zero() else ():
        logger.info(
            "optimizer group %s: %d tensors, %d parameters, lr %g, weight decay %g",
            group["name"],
            len(group["params"]),
            sum(p.numel() for p in group["params"]),
            group["lr"],
            group["weight_decay"],
        )
    return trainer.optimizer


def load_optimizer_and_scheduler_adopting(trainer, checkpoint, load):
    """``load(checkpoint)`` (transformers' ``_load_optimizer_and_scheduler``) with the saved optimizer state
    mapped onto our groups where it has another layout: an ``optimizer.pt`` written by the upstream Qwen-VL
    trainer's or a plain ``Trainer``'s ``create_optimizer`` (:func:`qwenvl.train.optim.adopt_optimizer_state`).

    DeepSpeed and FSDP load their own sharded states: untouched. A state that fits no layout is refused in one
    line naming the file and how to go on.
    """
    optimizer = trainer.optimizer
    if checkpoint is None or optimizer is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return load(checkpoint)
    own = vars(optimizer).get("load_state_dict")
    original = optimizer.load_state_dict
    model = trainer.model

    def adopting(state_dict):
        try:
            state_dict = adopt_optimizer_state(
                state_dict, optimizer, model, decay_parameter_names=trainer.get_decay_parameter_names(model)
            )
        except OptimizerStateMismatch as exc:
            raise OptimizerStateMismatch(
                f"{os.path.join(checkpoint, 'optimizer.pt')}: {exc}. To go on from the checkpoint's weights with a "
                "fresh optimizer state, move optimizer.pt out of the checkpoint folder"
            ) from None
        return original(state_dict)

    optimizer.load_state_dict = adopting
    try:
        return load(checkpoint)
    finally:
        if own is None:
            del optimizer.load_state_dict
        else:
            optimizer.load_state_dict = own


class UnpatchedPackedBatch(ValueError):
    """A packed batch reached a model that no qwenvl patch covers: transformers would crash on it, or worse,
    ignore its sample boundaries."""


def _refuse_unpatched_packed(model, inputs) -> None:
    """One line instead of a crash deep in transformers' mask code (or silently mixed samples): a batch in a
    packed convention that only the patch reads (``attention_mask`` as 1-D cu_seqlens, ``cu_seq_lens_q`` kwargs)
    while the model's family is not patched. Shape checks only: no host sync."""
    mask = inputs.get("attention_mask")
    packed = (isinstance(mask, torch.Tensor) and mask.ndim == 1) or "cu_seq_lens_q" in inputs
    if not packed:
        return
    from qwenvl.families import UnknownFamilyError, family_of_model
    from qwenvl.patches import active_patch

    try:
        family = family_of_model(model).name
    except UnknownFamilyError as exc:
        raise UnpatchedPackedBatch(f"a packed batch (cu_seqlens) for a model qwenvl cannot patch: {exc}") from None
    active = active_patch()
    if active is None or family not in active.families:
        raise UnpatchedPackedBatch(
            f"a packed batch (cu_seqlens) reached an unpatched {family} model: patch it first, "
            "`with qwenvl.patch(model): trainer.train()` (QwenVLTrainer.train does this when nothing is patched)"
        )


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
        if dummy_vision_pass_wanted(self.args):
            modalities = vision_modalities(self.train_dataset) or ("image",)
            self.vision_dummy = VisionDummy(self.model, modalities)
            logger.info(
                "vision dummy pass on (%d processes): every forward without them runs the vision tower for %s",
                self.args.world_size,
                " and ".join(modalities),
            )
        if self.optimizer is not None and (lrs := _per_component_lrs(self.args)):
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
        handle = self._patch_if_needed()
        try:
            return super().train(*args, **kwargs)
        finally:
            if handle is not None:
                handle.revert()

    def _patch_if_needed(self):
        from qwenvl.data import PackedCollator, PackedDataset
        from qwenvl.families import UnknownFamilyError, family_of_model
        from qwenvl.patches import active_patch, patch

        packed = isinstance(self.train_dataset, PackedDataset) or isinstance(self.data_collator, PackedCollator)
        if not packed or active_patch() is not None:
            return None  # ordinary batches need no patch; a patch the caller applied stays theirs (training_step judges it)
        try:
            family = family_of_model(self.model).name
        except UnknownFamilyError:
            return None  # not a model we patch; a packed batch reaching it is refused in training_step
        logger.info("QwenVLTrainer: %s patched for packed batches (qwenvl.patch(model)) for this training run", family)
        return patch(self.model)

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
        _refuse_unpatched_packed(self.model, inputs)
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.vision_dummy is not None and self.accelerator.sync_gradients:
            self._drop_untouched_vision_grads()
        return loss

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
