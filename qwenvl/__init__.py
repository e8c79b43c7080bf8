"""qwenvl: packed-sequence (varlen) training for Qwen-VL models, proven equal to the unpatched models.

Importing qwenvl patches nothing. Patching is explicit and reversible::

    import qwenvl
    with qwenvl.patch(backend="auto"):
        ...  # packed batches now train correctly

    handle = qwenvl.patch(model)   # or keep a handle
    handle.revert()
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["patch", "PatchOptions", "VarlenMeta", "varlen_attention", "__version__"]

from qwenvl._checkout import CheckoutPath

# Ours first, then an upstream fine-tuning checkout's own `qwenvl/` modules (qwenvl._checkout).
__path__ = CheckoutPath(__path__, __name__)


def __getattr__(name):
    # Lazy: `import qwenvl` stays cheap and never imports transformers or a kernel package.
    if name == "patch":
        from qwenvl.patches import patch

        return patch
    if name == "PatchOptions":
        from qwenvl.options import PatchOptions

        return PatchOptions
    if name == "VarlenMeta":
        from qwenvl.packing import VarlenMeta

        return VarlenMeta
    if name == "varlen_attention":
        from qwenvl.attention import varlen_attention

        return varlen_attention
    raise AttributeError(f"module 'qwenvl' has no attribute {name!r}")
