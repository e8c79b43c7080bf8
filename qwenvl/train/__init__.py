"""Training: ``QwenVLTrainer`` (``trainer``), per-component optimizer groups (``optim``) and the optimizer built
from them (``component_optimizer``), the DeepSpeed config check (``deepspeed_config``), checkpoint saving and
resuming (``checkpoint``), packed batches and the patch (``packed_patch``), the trainable report (``report``),
``qwenvl train`` (``run``, what it trains: ``tuning``), many GPUs (``distributed``) and the upstream drop-in
(``upstream``)."""

from qwenvl._checkout import CheckoutPath

# Ours first, then an upstream checkout's `qwenvl/train/` (its argument.py, train_qwen.py): qwenvl._checkout.
__path__ = CheckoutPath(__path__, __name__)
