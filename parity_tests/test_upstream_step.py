"""``benchmarks/upstream_step.py``: the flash-attn shim and upstream's patched model on transformers 4.57.6.

The shim's argument mapping (causal, scale, window, GQA, the packing) is checked on CPU against the plain
reference; its CPU kernel (``sdpa``) is the CPU tests' only, the CUDA timing runs the ``torch`` backend with the
same mapping. Upstream's patched model needs transformers 4.57 (this interpreter, or ``QWENVL_TF457_PYTHON``) and
a checkout of QwenLM's fine-tuning code (``QWENVL_UPSTREAM_CHECKOUT``: its ``qwen-vl-finetune`` folder; the
stand-in under ``parity_tests/upstream_checkout`` has no attention code): skipped without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from qwenvl.attention import UnsupportedAttentionOption
from qwenvl.packing import VarlenMeta
from qwenvl.reference import attention_ref, attention_ref_flash_out, mask_from_cu_seqlens
from tolerances import assert_close_by_rule, reference_dtype, tolerance

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "upstream_step.py"
_spec = importlib.util.spec_from_file_location("upstream_step", SCRIPT)
upstream_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upstream_step)


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def test_help_and_model_step_refusal():
    shown = _run(sys.executable, str(SCRIPT), "--help")
    assert shown.returncode == 0 and "--upstream-checkout" in shown.stdout and "--batches" in shown.stdout
    refused = _run(sys.executable, str(ROOT / "benchmarks" / "model_step.py"), "--methods", "ours", "upstream-4.57")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "--upstream-site DIR" in refused.stderr and "--upstream-checkout DIR" in refused.stderr
    if not (torch.cuda.is_available() and transformers.__version__.startswith("4.57.")):
        wrong = _run(sys.executable, str(SCRIPT), "--batches", "nowhere", "--upstream-checkout", "nowhere")
        assert wrong.returncode == 2 and ("put a 4.57.6 install first" in wrong.stderr or "no CUDA device" in wrong.stderr)


def test_kernel_choice():
    assert upstream_step.kernel_backend(torch.device("cuda", 0)) == "torch"
    assert upstream_step.kernel_backend(torch.device("cpu")) == "sdpa"


def _packed(lengths=(5, 1, 9, 3), heads=4, kv_heads=2, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, n, head_dim, generator=gen) for n in (heads, kv_heads, kv_heads))
    return q, k, v, VarlenMeta.from_lengths(lengths)


@pytest.mark.parametrize("causal, window, scale", [(True, (-1, -1), None), (False, (-1, -1), 0.3), (True, (2, 0), None),
                                                   (False, (1, 2), None)])
def test_shim_computes_flash_attn_varlen_func(causal, window, scale):
    """flash-attn's meaning of each argument, on CPU, against the plain masked softmax (float64) by the rule."""
    q, k, v, meta = _packed()
    out = upstream_step.flash_attn_varlen_func(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                                               softmax_scale=scale, causal=causal, window_size=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    mask = mask_from_cu_seqlens(meta.cu_seqlens, causal=causal, window=window)
    ref = reference_dtype("cpu", torch.float32)
    out_ref = attention_ref(*(t.to(ref) for t in (q, k, v)), mask, scale=scale)
    out_pt = attention_ref(q, k, v, mask, scale=scale, upcast=False)
    tol = tolerance("cpu", torch.float32)
    assert_close_by_rule(out, out_ref, (out_pt, attention_ref_flash_out(q, k, v, mask, scale=scale)), k=tol.k_out,
                         name="out", zero_atol=tol.zero_atol)


def test_shim_meta_for_the_torch_kernel_has_what_it_reads():
    _, _, _, meta = _packed()
    fast = upstream_step._meta(meta.cu_seqlens, meta.max_seqlen, meta.total, "torch")
    assert (fast.cu_seqlens.dtype, fast.max_seqlen, fast.total, fast.num_segments) == (torch.int32, 9, 18, 4)
    assert torch.equal(fast.cu_seqlens, meta.cu_seqlens)


@pytest.mark.parametrize("change, error", [
    ({"softcap": 5.0}, UnsupportedAttentionOption),
    ({"deterministic": True}, UnsupportedAttentionOption), ({"cu_seqlens_k": "copy"}, UnsupportedAttentionOption),
    ({"max_seqlen_k": 4}, UnsupportedAttentionOption), ({"return_attn_probs": True}, TypeError),
    ({"alibi_slopes": torch.ones(4)}, TypeError), ({"block_table": torch.zeros(1)}, TypeError),
])
def test_shim_refuses_what_it_cannot_honour(change, error):
    q, k, v, meta = _packed()
    args = dict(cu_seqlens_q=meta.cu_seqlens, cu_seqlens_k=meta.cu_seqlens, max_seqlen_q=meta.max_seqlen,
                max_seqlen_k=meta.max_seqlen, causal=True)
    args.update(change)
    if args["cu_seqlens_k"] == "copy":
        args["cu_seqlens_k"] = meta.cu_seqlens.clone()
    with pytest.raises(error):
        upstream_step.flash_attn_varlen_func(q, k, v, **args)
    with pytest.raises(NotImplementedError, match="flash_attn_varlen_func only"):
        upstream_step.flash_attn_func(q[None], k[None], v[None], causal=True)


def test_shim_passes_dropout_on():
    """Dropout reaches the kernel (the CPU one has it; the torch backend refuses it on CUDA): never dropped."""
    q, k, v, meta = _packed()
    args = (q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen)
    plain = upstream_step.flash_attn_varlen_func(*args, causal=True)
    torch.manual_seed(0)
    assert not torch.allclose(upstream_step.flash_attn_varlen_func(*args, dropout_p=0.5, causal=True), plain)


def test_shim_modules_come_and_go():
    assert "flash_attn" not in sys.modules
    with upstream_step.flash_attn_shim() as shim:
        from flash_attn.flash_attn_interface import flash_attn_varlen_func

        assert flash_attn_varlen_func is upstream_step.flash_attn_varlen_func and sys.modules["flash_attn"] is shim
        with pytest.raises(RuntimeError, match="already imported"), upstream_step.flash_attn_shim():
            pass
    assert "flash_attn" not in sys.modules and "flash_attn.flash_attn_interface" not in sys.modules


# Run in a process of its own: upstream's patch has no undo. argv: family, upstream checkout or "" (then transformers'
# own flash_attention_2 vision path through the shim alone). Prints one JSON line of the largest differences.
PATCHED_RUN = """
import importlib.util, json, sys, torch, transformers
import qwenvl
from qwenvl.fixtures import model_dir
from qwenvl.verify.batches import SampleSpec, make_sample, pack, sample_inputs
spec = importlib.util.spec_from_file_location("upstream_step", "benchmarks/upstream_step.py")
us = importlib.util.module_from_spec(spec); spec.loader.exec_module(us)
family, checkout = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir(family), dtype=torch.float32, attn_implementation="sdpa").eval()
gen = torch.Generator().manual_seed(0)
samples = [make_sample(model.config, SampleSpec(text=t, image=img), generator=gen) for t, img in [(20, (4, 4)), (15, None), (30, (4, 6))]]
inputs = pack(model, samples).model_inputs("upstream", host=False)
calls, sdpa = [], us.BACKENDS["sdpa"]
original = sdpa.attention
sdpa.attention = lambda *a, **k: (calls.append(bool(k["causal"])), original(*a, **k))[1]  # counts, then runs it
with torch.no_grad():
    alone = [model(**sample_inputs(model, s)).logits[0] for s in samples]
    with qwenvl.patch(model):
        ours = model(**inputs).logits[0]
    calls.clear()  # ours ran the same backend: only the shim's calls from here
    with us.flash_attn_shim() as shim:
        us.vision_on_flash_path(model, shim)
        if checkout:
            us.upstream_patch(checkout)
            theirs = model(**inputs).logits[0]
        else:
            theirs = torch.cat([model(**sample_inputs(model, s)).logits[0] for s in samples])
alone = torch.cat(alone)
print(json.dumps({"vs_ours": (theirs - ours).abs().max().item(), "vs_alone": (theirs - alone).abs().max().item(),
                  "causal_calls": sum(calls), "other_calls": len(calls) - sum(calls),
                  "text_layers": model.config.text_config.num_hidden_layers, "vision_blocks": model.config.vision_config.depth,
                  "images": sum(s.image_grid_thw is not None for s in samples)}))
"""


def _python_4_57() -> str:
    if transformers.__version__.startswith("4.57."):
        return sys.executable
    other = os.environ.get("QWENVL_TF457_PYTHON")
    if not other:
        pytest.skip(f"transformers {transformers.__version__} here; set QWENVL_TF457_PYTHON to a python with 4.57")
    return other


def _patched_run(family: str, checkout: str) -> dict:
    done = _run(_python_4_57(), "-c", PATCHED_RUN, family, checkout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_upstream_patch_with_the_shim_gives_our_logits(family):
    """Upstream's replace_qwen2_vl_attention_class() (its own trainer.py) with the shim, on a packed row of images and
    text: the logits of our patched model on the same row (the same kernel on CPU: exactly), and those of each sample
    alone, unpatched; every attention layer went through the shim."""
    checkout = os.environ.get("QWENVL_UPSTREAM_CHECKOUT")
    if not checkout:
        pytest.skip("set QWENVL_UPSTREAM_CHECKOUT to the qwen-vl-finetune folder of a QwenLM/Qwen3-VL checkout")
    got = _patched_run(family, checkout)
    assert got["vs_ours"] == 0.0, got
    assert got["vs_alone"] <= tolerance("cpu", torch.float32).model_atol, got
    assert (got["causal_calls"], got["other_calls"]) == (got["text_layers"], got["vision_blocks"]), got


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_tower_on_transformers_flash_path_through_the_shim(family):
    """Without upstream's code: transformers 4.57's own flash_attention_2 vision branch with the shim as its kernel
    gives each sample's logits of the plain sdpa model (whose vision attention runs per chunk, another code path)."""
    got = _patched_run(family, "")
    assert got["vs_alone"] <= tolerance("cpu", torch.float32).model_atol, got
    assert got["other_calls"] == got["images"] * got["vision_blocks"] and got["causal_calls"] == 0, got
