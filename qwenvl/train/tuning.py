"""What ``qwenvl train`` trains: parameters frozen by component (``--tune_mm_*``), and LoRA adapters on the
language model (``--lora_enable``) with the vision components it trains in full kept in the checkpoint.

Components are :func:`qwenvl.train.optim.classify`'s, the same that get their own learning rates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwenvl.train.optim import classify

if TYPE_CHECKING:
    from qwenvl.train.run import ModelArguments

__all__ = ["add_lora", "freeze"]


def freeze(model, model_args: ModelArguments) -> None:
    """Set ``requires_grad`` of every parameter by its component: ``--tune_mm_vision``, ``--tune_mm_mlp``,
    ``--tune_mm_llm``."""
    wanted = {"vision": model_args.tune_mm_vision, "projector": model_args.tune_mm_mlp, "base": model_args.tune_mm_llm}
    for name, param in model.named_parameters():
        param.requires_grad_(wanted[classify(name)])


def _component_roots(model, component: str) -> list[str]:
    """The last name part of each topmost module whose parameters ``classify`` puts in ``component`` (the vision
    tower and Qwen3-Omni's audio tower for "vision"; mergers, deepstack mergers and GLM-4V's downsample for
    "projector"): what PEFT's ``modules_to_save`` matches by suffix."""

    def of(name: str) -> str:
        return classify(f"{name}.weight") if name else "base"

    roots = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n and of(n) == component and of(n.rpartition(".")[0]) != component}
    return sorted(roots)


def add_lora(model, model_args: ModelArguments):
    """``model`` wrapped by PEFT with LoRA adapters on the language model's linear layers; the vision components
    trained in full where ``--tune_mm_*`` says so, and saved with the adapters."""
    from peft import LoraConfig, get_peft_model

    # The text model's linear layers, found by module identity: Qwen3-Omni's thinker keeps it at `model.*` on 4.57
    # (no "language_model" in the names).
    decoder = {id(m) for m in model.get_decoder().modules()}
    targets = sorted(
        {
            name
            for name, module in model.named_modules()
            if id(module) in decoder and classify(name) == "base" and type(module).__name__ == "Linear"
        }
    )
    if not targets:
        raise ValueError("LoRA found no linear layer of the language model to adapt")
    # PEFT saves only the adapters and `modules_to_save`: a vision component trained in full must be listed
    # there, or the checkpoint silently drops it (the encoders: the vision tower, Qwen3-Omni's audio tower too;
    # else the projectors). Which modules those are is `classify`'s rule, read at each module's top.
    full = _component_roots(model, "vision") if model_args.tune_mm_vision else []
    if model_args.tune_mm_mlp and not full:
        full = _component_roots(model, "projector")
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=full or None,
    )
    wrapped = get_peft_model(model, config)
    # PEFT freezes the base model; the vision components keep the --tune_mm_* choice. A module in
    # modules_to_save runs as its trainable copy (`.modules_to_save.default.`); the `.original_module.` beside it
    # takes no part in the forward and stays frozen (trainable, it would be a parameter DDP never sees used).
    for name, param in wrapped.named_parameters():
        if ".original_module." in name:
            continue
        component = classify(name)
        if component == "vision" and model_args.tune_mm_vision or component == "projector" and model_args.tune_mm_mlp:
            param.requires_grad_(True)
    return wrapped
