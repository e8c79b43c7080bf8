"""Every available attention backend equals the reference, outputs and gradients, by the tolerance rule.

CPU runs the sdpa backend in float32 and bfloat16; ``--device cuda`` runs every backend available there in
bfloat16 and float16 (and sdpa in float32). Options a backend cannot honour must raise, never be dropped.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import example, given

from qwenvl.attention import (
    BACKENDS,
    UnsupportedAttentionOption,
    available_backends,
    resolve_backend,
    varlen_attention,
)
from qwenvl.packing import VarlenMeta
from qwenvl.reference import attention_ref, mask_from_cu_seqlens
from strategies import AttnCase, attention_cases
from tolerances import assert_close_by_rule, reference_dtype, tolerance

HALF = (torch.bfloat16, torch.float16)


def _backend_dtypes(device: str):
    if device == "cpu":
        pairs = [("sdpa", torch.float32), ("sdpa", torch.bfloat16)]
    else:
        pairs = [("sdpa", torch.float32)]
        pairs += [(name, dtype) for name in available_backends(device) for dtype in HALF]
    return [
        pytest.param(
            (name, dtype),
            id=f"{name}-{str(dtype).removeprefix('torch.')}",
        )
        for name, dtype in pairs
    ]


def pytest_generate_tests(metafunc):
    if "backend_dtype" in metafunc.fixturenames:
        metafunc.parametrize("backend_dtype", _backend_dtypes(metafunc.config.getoption("--device")))


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@given(case=attention_cases())
@example(case=AttnCase(lengths=(64,), n_heads=4, kv_heads=1, head_dim=32, causal=True))
@example(case=AttnCase(lengths=(1,) * 16, n_heads=6, kv_heads=2, head_dim=13, causal=True))
@example(case=AttnCase(lengths=(0, 5, 0, 0, 3, 0), n_heads=4, kv_heads=2, head_dim=8, causal=False))
@example(case=AttnCase(lengths=(1, 2, 1, 3, 1, 2, 1, 1), n_heads=4, kv_heads=4, head_dim=16, causal=True, window=(1, 0)))
@example(case=AttnCase(lengths=(7,), n_heads=4, kv_heads=4, head_dim=8, causal=False, window=(2, 1), scale=0.3))
@example(case=AttnCase(lengths=(40, 2), n_heads=6, kv_heads=2, head_dim=16, causal=True, window=(4, -1)))
def test_backend_matches_reference(backend_dtype, device, case):
    backend, dtype = backend_dtype
    tol = tolerance(device, dtype)
    ref_dtype = reference_dtype(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    labels = {"test": "varlen_attention", "backend": backend, "device": device.type, "dtype": dtype_name}

    q, k, v, grad_out = case.tensors(dtype, device)
    meta = VarlenMeta.from_lengths(case.lengths, device=device)
    mask = mask_from_cu_seqlens(meta.cu_seqlens, causal=case.causal, window=case.window)
    opts = dict(causal=case.causal, window=case.window, scale=case.scale)

    out = varlen_attention(q, k, v, meta, backend=backend, **opts)
    assert out.shape == q.shape and out.dtype == dtype
    grads = _grads(out, (q, k, v), grad_out)

    ref_in = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v)]
    out_ref = attention_ref(*ref_in, mask, scale=case.scale)
    grads_ref = _grads(out_ref, ref_in, grad_out.to(ref_dtype))

    pt_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_pt = attention_ref(*pt_in, mask, scale=case.scale, upcast=False)
    grads_pt = _grads(out_pt, pt_in, grad_out)

    rule = dict(draw=case, record=labels, zero_atol=tol.zero_atol)
    assert_close_by_rule(out, out_ref, out_pt, k=tol.k_out, name="out", **rule)
    for name, g, g_ref, g_pt in zip(("dq", "dk", "dv"), grads, grads_ref, grads_pt):
        assert_close_by_rule(g, g_ref, g_pt, k=tol.k_grad, name=name, **rule)


def _small(device, dtype=torch.float32, lengths=(3, 0, 5), n_heads=4, kv_heads=2, head_dim=8):
    case = AttnCase(lengths=lengths, n_heads=n_heads, kv_heads=kv_heads, head_dim=head_dim)
    q, k, v, _ = case.tensors(dtype, device)
    return q, k, v, VarlenMeta.from_lengths(lengths, device=device)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    q, k, v, meta = _small(device, head_dim=13)
    torch.testing.assert_close(
        varlen_attention(q, k, v, meta, backend="sdpa"),
        varlen_attention(q, k, v, meta, backend="sdpa", scale=13**-0.5),
        rtol=0,
        atol=0,
    )


def test_zero_tokens(device):
    q, k, v, meta = _small(device, lengths=(0, 0))
    out = varlen_attention(q, k, v, meta, backend="sdpa")
    assert out.shape == (0, 4, 8)


def test_zero_length_segments_leave_no_trace(device):
    q, k, v, meta = _small(device, lengths=(3, 0, 0, 5, 0))
    squeezed = VarlenMeta.from_lengths((3, 5), device=device)
    torch.testing.assert_close(
        varlen_attention(q, k, v, meta, backend="sdpa"),
        varlen_attention(q, k, v, squeezed, backend="sdpa"),
        rtol=0,
        atol=0,
    )


def test_softcap_unsupported_on_sdpa(device):
    q, k, v, meta = _small(device)
    with pytest.raises(UnsupportedAttentionOption, match=r"'sdpa'.*softcap"):
        varlen_attention(q, k, v, meta, backend="sdpa", softcap=30.0)
    if device.type == "cpu":
        with pytest.raises(UnsupportedAttentionOption, match=r"softcap"):
            varlen_attention(q, k, v, meta, backend="auto", softcap=30.0)


@pytest.mark.gpu
@pytest.mark.parametrize("option", [{"dropout_p": 0.1}, {"softcap": 30.0}], ids=["dropout", "softcap"])
def test_torch_backend_refuses_what_it_cannot_do(device, option):
    if "torch" not in available_backends(device):
        pytest.skip("torch.nn.attention.varlen is not available")
    q, k, v, meta = _small(device, dtype=torch.bfloat16)
    name = next(iter(option))
    with pytest.raises(UnsupportedAttentionOption, match=rf"'torch'.*{name}"):
        varlen_attention(q, k, v, meta, backend="torch", **option)


@pytest.mark.gpu
@pytest.mark.parametrize("compute_dtype", [None, torch.float16, torch.bfloat16], ids=["default", "fp16", "bf16"])
def test_torch_backend_casts_fp32(device, compute_dtype):
    if "torch" not in available_backends(device):
        pytest.skip("torch.nn.attention.varlen is not available")
    case = AttnCase(lengths=(5, 1, 9), n_heads=4, kv_heads=2, head_dim=16)
    q, k, v, grad_out = case.tensors(torch.float32, device)
    meta = VarlenMeta.from_lengths(case.lengths, device=device)
    out = varlen_attention(q, k, v, meta, backend="torch", compute_dtype=compute_dtype)
    assert out.dtype == torch.float32
    grads = _grads(out, (q, k, v), grad_out)
    assert all(g.dtype == torch.float32 for g in grads)

    # The fp32 call must equal casting by hand to the compute dtype (bf16 by default) and back.
    half = compute_dtype or torch.bfloat16
    cast = [t.detach().to(half).requires_grad_() for t in (q, k, v)]
    out_half = varlen_attention(*cast, meta, backend="torch")
    torch.testing.assert_close(out, out_half.float(), rtol=0, atol=0)
    # The backward may accumulate dq with atomics, so gradients match to the half dtype's rounding only.
    for g, g_half in zip(grads, _grads(out_half, cast, grad_out.to(half))):
        torch.testing.assert_close(g.to(half), g_half)

    with torch.autocast("cuda", dtype=torch.float16):
        out_auto = varlen_attention(*[t.detach() for t in (q, k, v)], meta, backend="torch")
    if compute_dtype is None:
        fp16 = [t.detach().half() for t in (q, k, v)]
        torch.testing.assert_close(out_auto, varlen_attention(*fp16, meta, backend="torch").float(), rtol=0, atol=0)


def _dropout_backends(device):
    return [name for name in available_backends(device) if name != "torch"]


@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_dropout_is_applied_and_seeded(device, backend):
    if backend not in _dropout_backends(device):
        pytest.skip(f"{backend} is not available on {device}")
    dtype = torch.float32 if backend == "sdpa" else torch.bfloat16
    q, k, v, meta = _small(device, dtype=dtype, lengths=(6, 0, 9))
    plain = varlen_attention(q, k, v, meta, backend=backend)
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        outs.append(varlen_attention(q, k, v, meta, backend=backend, dropout_p=0.5))
    assert not torch.equal(outs[0], plain), "dropout_p=0.5 changed nothing"
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    (dq,) = torch.autograd.grad(outs[0].sum(), (q,))
    assert torch.isfinite(dq).all()


def test_dropout_unsupported_on_torch_backend_is_not_picked_by_auto(device):
    dtype = torch.bfloat16
    chosen = resolve_backend("auto", device=device, dtype=dtype, dropout_p=0.1, window=(-1, -1), softcap=0.0)
    assert chosen != "torch"


def test_auto_resolution(device):
    kw = dict(dropout_p=0.0, window=(-1, -1), softcap=0.0)
    assert resolve_backend("auto", device=device, dtype=torch.float32, **kw) == "sdpa"
    assert resolve_backend("auto", device="cpu", dtype=torch.bfloat16, **kw) == "sdpa"
    if device.type == "cuda":
        best = "flash_attn" if "flash_attn" in available_backends(device) else "torch"
        if best in available_backends(device):
            assert resolve_backend("auto", device=device, dtype=torch.bfloat16, **kw) == best


def test_unknown_backend_lists_names(device):
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'.*sdpa.*torch.*flash_attn"):
        resolve_backend("nope", device=device, dtype=torch.float32, dropout_p=0.0, window=(-1, -1), softcap=0.0)
    assert set(BACKENDS) == {"sdpa", "torch", "flash_attn", "reference"}


def test_backends_unavailable_on_cpu_say_so():
    assert available_backends("cpu") == ["sdpa", "reference"]
    q, k, v, meta = _small("cpu")
    for name in ("torch", "flash_attn"):
        with pytest.raises(ValueError, match=rf"{name}.*not available on cpu"):
            varlen_attention(q, k, v, meta, backend=name)


BAD_INPUTS = [
    pytest.param(dict(kv_heads=3), r"multiple of kv heads", id="heads-not-divisible"),
    pytest.param(dict(meta_lengths=(3, 4)), r"8 tokens but meta.cu_seqlens ends at 7", id="token-count"),
    pytest.param(dict(meta_device="meta"), r"meta.cu_seqlens is on meta", id="cu-seqlens-device"),
    pytest.param(dict(k_dtype=torch.float64), r"share a dtype", id="dtype"),
    pytest.param(dict(q_shape=(8, 4)), r"q must be a 3-D tensor", id="q-2d"),
    pytest.param(dict(window=(-2, 0)), r"window must be", id="window"),
    pytest.param(dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)", id="dropout"),
    pytest.param(dict(softcap=-1.0), r"softcap must be >= 0", id="softcap"),
]


@pytest.mark.parametrize("bad, message", BAD_INPUTS)
def test_bad_inputs_raise(bad, message):
    lengths = (3, 0, 5)
    q = torch.randn(8, 4, 8)
    k = torch.randn(8, bad.get("kv_heads", 2), 8, dtype=bad.get("k_dtype", torch.float32))
    v = k.clone()
    if "q_shape" in bad:
        q = torch.randn(bad["q_shape"])
    meta = VarlenMeta.from_lengths(bad.get("meta_lengths", lengths), device=bad.get("meta_device", "cpu"))
    opts = {key: bad[key] for key in ("window", "dropout_p", "softcap") if key in bad}
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, v, meta, backend="sdpa", **opts)


def test_import_loads_no_optional_backend():
    code = (
        "import sys, qwenvl, qwenvl.attention, qwenvl.reference\n"
        "bad = [m for m in ('flash_attn', 'flash_attn_interface', 'jax', 'qwenvl.attention._torch_varlen',"
        " 'qwenvl.attention._flash_attn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
