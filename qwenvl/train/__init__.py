"""Training: ``QwenVLTrainer`` (``trainer``), per-component optimizer groups (``optim``), the trainable report
(``report``), ``qwenvl train`` (``run``), many GPUs (``distributed``) and the upstream drop-in (``upstream``)."""

from qwenvl._checkout import CheckoutPath

# Ours first, then an upstream checkout's `qwenvl/train/` (its argument.py, train_qwen.py): qwenvl._checkout.
__path__ = CheckoutPath(__path__, __name__)
