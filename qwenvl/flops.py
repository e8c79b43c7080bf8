"""A training step's matmul FLOPs, from a model's parameter counts: the one model behind the benchmarks' MFU
(``benchmarks/model_step.py``) and the ranks' compute balance (``benchmarks/distributed.py``).

Training costs 6 FLOPs per parameter of a matmul per token that passes it (2 forward, 4 backward)::

    text tokens     6 x (text + lm_head) each      every token, vision placeholders included, runs the text model
                                                   and the output head (vocab x hidden, tied or not: a matmul)
    vision patches  6 x vision each                the tower runs on patches; spatial_merge_size^2 of them make one
                                                   placeholder token

Attention's score and value products grow with the segments' lengths, not the parameters: the callers add them
(``benchmarks/model_step.py`` for the text model's full-attention layers) or leave them out and say so. An MoE
model's text count holds every expert, of which a token passes only its top k: for those families the count is an
upper bound.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["MatmulParameters", "matmul_parameters"]


class MatmulParameters(NamedTuple):
    """Parameter counts by where a token meets them (``matmul_parameters``)."""

    text: int  # the text model's: every parameter outside the towers, but the token embedding and the output head
    lm_head: int  # the output head's matmul, vocab x hidden, whether or not it is tied to the embedding
    vision: int  # the vision tower's (not counted: further encoders, Qwen3-Omni's audio tower)

    def training_flops(self, text_tokens: int, patches: int) -> float:
        """6 FLOPs per parameter per token (the module docstring), attention's products left out."""
        return 6.0 * (self.text + self.lm_head) * text_tokens + 6.0 * self.vision * patches

    def vision_token_cost(self, patches_per_token: int) -> float:
        """What one vision placeholder token costs in text tokens: it runs the text model and the head like any
        token, after its ``patches_per_token`` patches ran the tower."""
        per_text_token = self.text + self.lm_head
        return (per_text_token + patches_per_token * self.vision) / per_text_token


def matmul_parameters(model) -> MatmulParameters:
    """``model``'s counts (a meta-device model will do: only shapes are read). The towers are its family's
    (``FamilySpec.vision_tower``, ``other_towers``); a parameter shared by two places counts once."""
    from qwenvl.families import family_of_model

    spec = family_of_model(model)
    tower = spec.vision_tower_in(model)
    vision = list(tower.parameters()) if tower is not None else []
    vision_ids = {id(p) for p in vision}
    other_ids = {
        id(p) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in spec.other_towers for p in module.parameters()
    }
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    text = sum(
        p.numel()
        for p in model.parameters()
        if id(p) not in vision_ids and id(p) not in other_ids and p is not embedding and p is not head
    )
    return MatmulParameters(text=text, lm_head=head.numel(), vision=sum(p.numel() for p in vision))
