"""What the upstream trainer module does when imported: every Trainer's create_optimizer replaced, a trainable
printout added to the model classes. Its attention patch needs flash-attn."""

from transformers import Trainer
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5_vl


def replace_qwen2_vl_attention_class():
    from flash_attn import flash_attn_varlen_func  # noqa: F401  (upstream's kernel)

    raise NotImplementedError("the test checkout never runs upstream's attention")


def print_trainable_parameters_visual(self):
    trainable = [i for i, block in enumerate(self.blocks) if all(p.requires_grad for p in block.parameters())]
    frozen = [i for i in range(len(self.blocks)) if i not in trainable]
    print("Vision Module - Attention Blocks:")
    print(f"Trainable Block Indices: {trainable if trainable else 'None'}")
    print(f"Non-Trainable Block Indices: {frozen if frozen else 'None'}")
    print(f"Merger Module Trainable: {any(p.requires_grad for p in self.merger.parameters())}")


def print_trainable_parameters(self):
    layers = self.language_model.layers
    trainable = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    frozen = [i for i in range(len(layers)) if i not in trainable]
    embed = any(p.requires_grad for p in self.language_model.embed_tokens.parameters())
    print(f"LLM Module - Embed Tokens Trainable: {embed}")
    print(f"LLM Module - Trainable Layer Indices: {trainable if trainable else 'None'}")
    print(f"LLM Module - Non-Trainable Layer Indices: {frozen if frozen else 'None'}")


def create_optimizer(self):
    """2 groups (decay / no-decay); 4 with mm_projector_lr (projector apart); 6 with vision_tower_lr too (vision
    apart within the non-projector groups). An lr of 0 counts as unset. Empty groups are kept."""
    if self.optimizer is not None:
        return self.optimizer
    model = self.model
    decay = [n for n in self.get_decay_parameter_names(model) if "bias" not in n]
    named = list(model.named_parameters())

    def params(want_decay, projector=None, vision=None):
        return [
            p
            for n, p in named
            if p.requires_grad
            and (n in decay) == want_decay
            and (projector is None or ("merger" in n) == projector)
            and (vision is None or ("visual" in n) == vision)
        ]

    wd, args = self.args.weight_decay, self.args
    if args.mm_projector_lr:
        if args.vision_tower_lr:
            groups = [
                {"params": params(True, False, False), "weight_decay": wd},
                {"params": params(True, False, True), "weight_decay": wd, "lr": args.vision_tower_lr},
                {"params": params(False, False, False), "weight_decay": 0.0},
                {"params": params(False, False, True), "weight_decay": 0.0, "lr": args.vision_tower_lr},
            ]
        else:
            groups = [
                {"params": params(True, False), "weight_decay": wd},
                {"params": params(False, False), "weight_decay": 0.0},
            ]
        groups += [
            {"params": params(True, True), "weight_decay": wd, "lr": args.mm_projector_lr},
            {"params": params(False, True), "weight_decay": 0.0, "lr": args.mm_projector_lr},
        ]
    else:
        groups = [{"params": params(True), "weight_decay": wd}, {"params": params(False), "weight_decay": 0.0}]
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
    self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
    return self.optimizer


Trainer.create_optimizer = create_optimizer
qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel.print_trainable_parameters = print_trainable_parameters_visual
qwen2_5_vl.Qwen2_5_VLModel.print_trainable_parameters = print_trainable_parameters
