"""Slow, obvious reference code that the fast paths are tested against (shipped as ``qwenvl.reference``).

``attention`` is plain PyTorch; ``jax_attention`` is an independent JAX twin, imported only on request
(it needs the optional ``jax`` extra).
"""

from .attention import (
    attention_ref,
    attention_ref_flash_grads,
    attention_ref_flash_out,
    block_diag_mask,
    mask_from_cu_seqlens,
    mask_from_position_ids,
    mask_from_segment_ids,
)

__all__ = [
    "attention_ref",
    "attention_ref_flash_grads",
    "attention_ref_flash_out",
    "block_diag_mask",
    "mask_from_cu_seqlens",
    "mask_from_position_ids",
    "mask_from_segment_ids",
]
