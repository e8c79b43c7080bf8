"""Checkpoints that transformers' own saving and resuming would leave unloadable or half loaded.

- :func:`load_optimizer_and_scheduler_adopting`: an ``optimizer.pt`` in another group layout (the upstream
  Qwen-VL trainer's, a plain ``Trainer``'s) resumes, its state mapped onto our groups parameter by parameter.
- :func:`_fill_missing_optimizer_state`: before an FSDP save, every parameter gets the optimizer state it would
  have had, so that torch's distributed checkpoint can load it back.
- :func:`_checkpoint_keys`: the weight names a checkpoint folder holds, to tell when its names are not the
  model's (``QwenVLTrainer._load_from_checkpoint``).
- :func:`save_stream_state` / :func:`load_stream_state`: a ``StreamingDataset``'s position (``state_dict()``), one
  small JSON file per rank in ``checkpoint-N/``, so a resumed run reads on exactly where the saved one stopped.
"""

from __future__ import annotations

import json
import os

import torch

from qwenvl.train.optim import OptimizerStateMismatch, adopt_optimizer_state

__all__ = ["load_optimizer_and_scheduler_adopting", "save_stream_state", "load_stream_state", "STREAM_STATE"]

STREAM_STATE = "qwenvl_stream_rank{rank}.json"


def save_stream_state(folder: str, dataset, rank: int) -> str:
    """Write ``dataset.state_dict()`` to ``folder/qwenvl_stream_rank<rank>.json``; returns the file's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, STREAM_STATE.format(rank=rank))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataset.state_dict(), f)
    return path


def load_stream_state(folder: str, dataset, rank: int) -> None:
    """``dataset.load_state_dict`` from ``folder``'s file for ``rank``; a checkpoint without one is refused in one line."""
    path = os.path.join(folder, STREAM_STATE.format(rank=rank))
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder} holds no {os.path.basename(path)}: it was not saved by a streaming run on as many ranks, so "
            "where the stream stopped is unknown (resume a streaming run from its own checkpoints)"
        )
    with open(path, encoding="utf-8") as f:
        dataset.load_state_dict(json.load(f))


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
