"""The ``upstream-4.57`` row of ``benchmarks/model_step.py``: one training step under the upstream trainer's patch on
transformers 4.57.6, in its own process, on the batches ``model_step.py --save-batches`` wrote.

What runs, as upstream's ``train_qwen.py`` runs it (``attn_implementation="flash_attention_2"``, then
``replace_qwen2_vl_attention_class()`` for flattened / packed data):

- upstream's ``qwenvl/train/trainer.py``, imported unmodified from a checkout of QwenLM's fine-tuning code
  (``--upstream-checkout``: its ``qwen-vl-finetune`` folder), as ``parity_tests/test_upstream_dropin.py`` imports
  the checkout's trainer (``importlib`` from the file), then its ``replace_qwen2_vl_attention_class()``: its own
  text attention forward, and its mask function handing ``cu_seqlens`` through as the attention mask;
- the vision tower on transformers 4.57's own ``flash_attention_2`` path (``cu_seqlens`` per image), the shim's
  kernel put there the way transformers loads a hub flash kernel (``lazy_import_flash_attention(kernel)``);
- flash-attn itself replaced by a shim (``flash_attn`` in ``sys.modules``): ``flash_attn_varlen_func`` runs the
  kernel of qwenvl's ``torch`` attention backend (``torch.nn.attention.varlen``; aten's flash op for fewer kv
  heads), so this row and ``ours`` differ in everything but the attention kernel. An argument the shim cannot
  honour is refused (``UnsupportedAttentionOption``, ``TypeError``), never dropped.

Weights are random (another draw than model_step's), bf16, CUDA; timing, sync counting and the row's columns are
model_step's (``time_steps``). Each (model, mix) is printed as one JSON line on stdout. On CPU the shim runs the
``sdpa`` backend instead (``kernel_backend``): for the CPU tests only; a timing refuses to run without CUDA::

    PYTHONPATH=SITE_4_57_6 python benchmarks/upstream_step.py --batches DIR --upstream-checkout qwen-vl-finetune
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import json
import sys
import types
from collections import Counter
from pathlib import Path

import torch

from qwenvl.attention import BACKENDS, UnsupportedAttentionOption, resolve_backend
from qwenvl.packing import VarlenMeta

__all__ = ["kernel_backend", "flash_attn_varlen_func", "flash_attn_func", "flash_attn_shim", "load_upstream_trainer",
           "vision_on_flash_path", "upstream_patch", "main"]

SHIM_MODULES = ("flash_attn", "flash_attn.flash_attn_interface")
TRAINER = Path("qwenvl") / "train" / "trainer.py"
STAND_IN = Path(__file__).resolve().parent.parent / "parity_tests" / "upstream_checkout"
METHOD = "upstream-4.57"


def kernel_backend(device: torch.device) -> str:
    """The qwenvl backend the shim runs on ``device``: ``torch`` on CUDA (what every timing uses); ``sdpa`` on CPU,
    only so that the CPU tests can run upstream's patched model (``main`` refuses to time without CUDA)."""
    return "torch" if device.type == "cuda" else "sdpa"


def _meta(cu_seqlens_S1: torch.Tensor, max_seqlen: int, total: int, backend: str) -> VarlenMeta:
    if backend == "torch":
        # flash-attn keeps the boundaries on the device and takes max_seqlen from its caller: no sync here either.
        # The torch backend reads cu_seqlens, max_seqlen and the total only, so the host offsets are just (0, T).
        return VarlenMeta(cu_seqlens_S1.to(torch.int32), max_seqlen, cu_seqlens_S1.numel() - 1, (0, total))
    return VarlenMeta.from_cu_seqlens(cu_seqlens_S1, total=total)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    """flash-attn's ``flash_attn_varlen_func`` on qwenvl's kernel (``kernel_backend``).

    q ``(T, N, H)``, k and v ``(T, K, H)`` (``N % K == 0``), ``cu_seqlens`` int32 ``(S + 1,)`` on q's device,
    ``max_seqlen`` an int (a 0-d tensor is read as flash-attn's binding reads it: one sync). Returns ``(T, N, H)``.
    ``window_size`` is flash-attn's ``(left, right)``, -1 unbounded, as qwenvl's. Refused: another ``cu_seqlens_k``
    or ``max_seqlen_k`` than q's (the shim runs self-attention over one packing), ``deterministic=True``, and what
    the backend cannot honour (dropout, softcap, float32 on CUDA); any other argument is a ``TypeError``.
    """
    if cu_seqlens_k is not cu_seqlens_q:
        raise UnsupportedAttentionOption("flash_attn shim", "cu_seqlens_k", "must be cu_seqlens_q: one packing for q and kv")
    max_seqlen = int(max_seqlen_q)
    if max_seqlen_k is not max_seqlen_q and int(max_seqlen_k) != max_seqlen:
        raise UnsupportedAttentionOption("flash_attn shim", f"max_seqlen_k={int(max_seqlen_k)}", f"must be max_seqlen_q={max_seqlen}")
    if deterministic:
        raise UnsupportedAttentionOption("flash_attn shim", "deterministic=True", "the torch kernel makes no such promise")
    if q.dim() != 3:
        raise ValueError(f"flash_attn_varlen_func takes q as (total, heads, head_dim), got {tuple(q.shape)}")
    head_dim, window = q.shape[-1], tuple(window_size)
    name = kernel_backend(q.device)
    resolve_backend(name, device=q.device, dtype=q.dtype, dropout_p=dropout_p, window=window, softcap=softcap, head_dim=head_dim)
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    return BACKENDS[name].attention(q, k, v, _meta(cu_seqlens_q, max_seqlen, q.shape[0], name), causal=causal, scale=scale,
                                    dropout_p=dropout_p, window=window, softcap=softcap, compute_dtype=q.dtype)


def flash_attn_func(*args, **kwargs):
    """Refused: the shim maps the packed (varlen) entry point only."""
    raise NotImplementedError("the flash_attn shim maps flash_attn_varlen_func only; flash_attn_func (padded batches) was called")


@contextlib.contextmanager
def flash_attn_shim():
    """``flash_attn`` and ``flash_attn.flash_attn_interface`` in ``sys.modules`` as this module's two functions;
    yields the ``flash_attn`` module. Import transformers first: a module in ``sys.modules`` answers ``find_spec``."""
    if any(name in sys.modules for name in SHIM_MODULES):
        raise RuntimeError("flash_attn is already imported: the shim would run beside it, not instead of it")
    modules = {}
    for name in SHIM_MODULES:
        module = types.ModuleType(name, "qwenvl benchmark shim: flash-attn's varlen entry point on qwenvl's torch kernel")
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=__file__)
        module.flash_attn_varlen_func, module.flash_attn_func = flash_attn_varlen_func, flash_attn_func
        modules[name] = module
    modules["flash_attn"].flash_attn_interface = modules["flash_attn.flash_attn_interface"]
    sys.modules.update(modules)
    try:
        yield modules["flash_attn"]
    finally:
        for name in SHIM_MODULES:
            sys.modules.pop(name, None)


def load_upstream_trainer(checkout: Path) -> types.ModuleType:
    """Upstream's ``qwenvl/train/trainer.py`` from ``checkout`` (its ``qwen-vl-finetune`` folder), run as it is.
    Its import replaces ``Trainer.create_optimizer`` for every Trainer, as it does in upstream's script."""
    file = Path(checkout) / TRAINER
    if Path(checkout).resolve() == STAND_IN:
        raise ValueError(f"{STAND_IN} is the tests' stand-in (no upstream attention code): pass a checkout of QwenLM's qwen-vl-finetune")
    if not file.is_file():
        raise FileNotFoundError(f"no {TRAINER} under {checkout}: pass the qwen-vl-finetune folder of a QwenLM/Qwen3-VL checkout")
    spec = importlib.util.spec_from_file_location("upstream_trainer", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vision_on_flash_path(model, shim: types.ModuleType) -> None:
    """The vision tower on transformers' ``flash_attention_2`` branch with the shim as its kernel, as upstream's
    script loads it. For this process: transformers' flash kernel is a module global, set for every model."""
    from transformers import modeling_flash_attention_utils

    modeling_flash_attention_utils.lazy_import_flash_attention(shim, force_import=True)
    model.config.vision_config._attn_implementation = "flash_attention_2"


def upstream_patch(checkout: Path) -> types.ModuleType:
    """Import upstream's trainer and apply its ``replace_qwen2_vl_attention_class()`` (for the whole process)."""
    trainer = load_upstream_trainer(checkout)
    trainer.replace_qwen2_vl_attention_class()
    return trainer


def _row(saved: dict, model, *, warmup: int, iters: int) -> dict:
    import model_step  # this folder is sys.path[0]: the timing loop and the columns are model_step's

    seconds, gib, sites, busy = model_step.time_steps(model, saved["inputs"], contextlib.nullcontext(), warmup=warmup, iters=iters)
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in model_step.PEAK_BF16.items() if k in gpu), None)
    return {"model": saved["model"], "mix": saved["mix"], "method": METHOD, "tokens": saved["tokens"], "ms": seconds * 1e3,
            "tokens_per_s": saved["tokens"] / seconds, "peak_gib": gib,
            "mfu": saved["flops"] / seconds / peak if peak else None, "host_syncs": len(sites),
            "sync_sites": dict(Counter(sites)), "gpu_busy": busy}


def _batches(folder: Path, models, mixes) -> list[dict]:
    found = [torch.load(f, weights_only=True) for f in sorted(Path(folder).glob("*.pt"))]
    found = [b for b in found if (not models or b["model"] in models) and (not mixes or b["mix"] in mixes)]
    if not found:
        raise FileNotFoundError(f"no saved batch in {folder} for models {models} and mixes {mixes} (model_step.py --save-batches)")
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", required=True, help="the folder model_step.py --save-batches wrote")
    p.add_argument("--upstream-checkout", required=True, help="the qwen-vl-finetune folder of a QwenLM/Qwen3-VL checkout")
    p.add_argument("--models", nargs="*", help="only these models' batches (default: every one saved)")
    p.add_argument("--mixes", nargs="*", help="only these mixes")
    p.add_argument("--vision", choices=["flash_attention_2", "sdpa"], default="flash_attention_2",
                   help="the vision tower's attention: upstream's script loads flash_attention_2 (the shim's kernel)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=6)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    if not transformers.__version__.startswith("4.57."):
        print(f"upstream_step.py: transformers {transformers.__version__} from {transformers.__file__}; put a 4.57.6 "
              "install first on PYTHONPATH (model_step.py --upstream-site)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("upstream_step.py: no CUDA device (the shim's CPU kernel is for the CPU tests only)", file=sys.stderr)
        return 2
    import model_step

    with flash_attn_shim() as shim:
        upstream_patch(Path(args.upstream_checkout))
        for saved in _batches(Path(args.batches), args.models, args.mixes):
            model = None
            try:
                model = model_step.build_from(saved["config"])
                if args.vision == "flash_attention_2":
                    vision_on_flash_path(model, shim)
                row = _row(saved, model, warmup=args.warmup, iters=args.iters)
            except Exception as exc:  # noqa: BLE001 - reported as model_step reports a method that cannot run
                row = {"model": saved["model"], "mix": saved["mix"], "method": METHOD, "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(json.dumps({**row, "transformers": transformers.__version__, "vision_attention": args.vision}), flush=True)
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
