"""Every available attention backend equals the reference, outputs and gradients, by the tolerance rule.

CPU runs the sdpa backend in float32 and bfloat16; ``--device cuda`` runs every backend available there in
bfloat16 and float16 (and sdpa in float32). Options a backend cannot honour must raise, never be dropped.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwenvl.attention import (
    BACKENDS,
    UnsupportedAttentionOption,
    available_backends,
    resolve_backend,
    varlen_attention,
)
from qwenvl.attention import _registry
from qwenvl.packing import VarlenMeta
from qwenvl.tolerances import judge
from qwenvl.reference import attention_ref, attention_ref_flash_grads, attention_ref_flash_out, mask_from_cu_seqlens
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


@pytest.mark.slow
@given(case=attention_cases())
@example(case=AttnCase(lengths=(64,), n_heads=4, kv_heads=1, head_dim=32, causal=True))
@example(case=AttnCase(lengths=(1,) * 16, n_heads=6, kv_heads=2, head_dim=13, causal=True))
@example(case=AttnCase(lengths=(0, 5, 0, 0, 3, 0), n_heads=4, kv_heads=2, head_dim=8, causal=False))
@example(
    case=AttnCase(lengths=(1, 2, 1, 3, 1, 2, 1, 1), n_heads=4, kv_heads=4, head_dim=16, causal=True, window=(1, 0))
)
@example(case=AttnCase(lengths=(7,), n_heads=4, kv_heads=4, head_dim=8, causal=False, window=(2, 1), scale=0.3))
@example(case=AttnCase(lengths=(40, 2), n_heads=6, kv_heads=2, head_dim=16, causal=True, window=(4, -1)))
# One key per query: autograd's softmax backward is exact there, fused kernels are not (see qwenvl.tolerances).
@example(case=AttnCase(lengths=(12,), n_heads=4, kv_heads=4, head_dim=8, causal=False, window=(0, 0)))
@example(
    case=AttnCase(
        lengths=(2, 1), n_heads=4, kv_heads=2, head_dim=32, causal=False, window=(0, 1), scale=0.3, seed=33597
    )
)
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

    # Fused kernels compute the way FlashAttention does: those plain computations are yardsticks too.
    out_flash = attention_ref_flash_out(q, k, v, mask, scale=case.scale)
    grads_flash = attention_ref_flash_grads(q, k, v, mask, out_pt, grad_out, scale=case.scale)
    out_yardsticks, grad_yardsticks = (out_pt, out_flash), list(zip(grads_pt, grads_flash))
    if _runs_tf32x3(backend, device, dtype):  # float32 SDPA's memory-efficient kernel multiplies in 3xTF32
        out_yardsticks += (attention_ref_flash_out(q, k, v, mask, scale=case.scale, tf32x3=True),)
        tf32 = attention_ref_flash_grads(q, k, v, mask, out_pt, grad_out, scale=case.scale, tf32x3=True)
        grad_yardsticks = [(*pair, g) for pair, g in zip(grad_yardsticks, tf32)]

    rule = dict(draw=case, record=labels, zero_atol=tol.zero_atol)
    assert_close_by_rule(out, out_ref, out_yardsticks, k=tol.k_out, name="out", **rule)
    for name, g, g_ref, yardsticks in zip(("dq", "dk", "dv"), grads, grads_ref, grad_yardsticks):
        assert_close_by_rule(g, g_ref, yardsticks, k=tol.k_grad, name=name, **rule)


def _runs_tf32x3(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """float32 SDPA on a GPU of compute capability >= 8.0: the memory-efficient kernel, whose matmuls are 3xTF32."""
    return backend == "sdpa" and dtype == torch.float32 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def test_tf32_rounding_is_to_nearest_ties_away():
    """``round_tf32`` keeps 10 mantissa bits as ``cvt.rna.tf32.f32`` does (ties away from zero, both signs)."""
    from qwenvl.reference.attention import round_tf32

    ulp = 2.0**-10  # TF32's at 1
    x = torch.tensor([1.0, 1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 4, 1 + 3 * ulp / 4, 3.1, -0.0], dtype=torch.float32)
    # 3.1 = 1.55 * 2: the ulp there is 2**-9, and 3.099609375 is the nearest multiple of it
    want = torch.tensor([1.0, 1 + ulp, -(1 + ulp), 1.0, 1 + ulp, 3.099609375, -0.0])
    assert torch.equal(round_tf32(x), want)


@pytest.mark.gpu
def test_the_tf32x3_yardsticks_bound_the_memory_efficient_kernel_where_float32_ones_cannot(device):
    """With one key per query the probabilities are exactly 1: the output is exactly ``V`` and ``dk`` exactly 0, and
    so are the float32 yardsticks' within an ulp, which would leave the rule a bound of the floor alone. The
    kernel's 3xTF32 matmuls keep ~21 bits and stray further; the tf32x3 yardsticks stray as far, and bound it."""
    if not _runs_tf32x3("sdpa", device, torch.float32):
        pytest.skip("float32 SDPA runs the 3xTF32 memory-efficient kernel on GPUs of compute capability >= 8.0")
    case = AttnCase(lengths=(12,), n_heads=4, kv_heads=4, head_dim=8, causal=False, window=(0, 0))
    q, k, v, _ = case.tensors(torch.float32, device)
    meta = VarlenMeta.from_lengths(case.lengths, device=device)
    mask = mask_from_cu_seqlens(meta.cu_seqlens, causal=False, window=(0, 0))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = varlen_attention(q, k, v, meta, backend="sdpa", causal=False, window=(0, 0))
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    exact_out, exact_dk = v.detach().double(), torch.zeros_like(dk, dtype=torch.float64)
    assert not torch.equal(out.detach(), v.detach()), "the split should leave V's low bits off somewhere"
    tol = tolerance(device, torch.float32)
    yard_out = attention_ref_flash_out(q, k, v, mask, tf32x3=True)
    assert judge(out, exact_out, yard_out, k=tol.k_out).passed
    yard_dk = attention_ref_flash_grads(q, k, v, mask, out.detach(), dout, tf32x3=True)[1]
    assert (verdict := judge(dk, exact_dk, yard_dk, k=tol.k_grad)).passed, verdict


@settings(max_examples=40, deadline=None)
@given(case=attention_cases())
def test_flash_style_yardsticks_compute_the_same_maths(case):
    """In float64 the fused-kernel-style plain computations equal the softmax reference and its autograd
    gradients to float64 rounding: they are the same maths rounded another way, never another function."""
    q, k, v, grad_out = (t.double() for t in case.tensors(torch.float32, torch.device("cpu")))
    mask = mask_from_cu_seqlens(
        VarlenMeta.from_lengths(case.lengths).cu_seqlens, causal=case.causal, window=case.window
    )
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention_ref(*ins, mask, scale=case.scale)
    grads = torch.autograd.grad(out, ins, grad_out, allow_unused=True)
    torch.testing.assert_close(attention_ref_flash_out(q, k, v, mask, scale=case.scale), out, rtol=1e-12, atol=1e-12)
    flash_grads = attention_ref_flash_grads(q, k, v, mask, out, grad_out, scale=case.scale)
    for got, want in zip(flash_grads, grads):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-10, atol=1e-10)


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

    # Under fp16 autocast the default compute dtype is autocast's (fp16, not the bf16 default); an explicit
    # compute_dtype still wins.
    with torch.autocast("cuda", dtype=torch.float16):
        out_auto = varlen_attention(
            *[t.detach() for t in (q, k, v)], meta, backend="torch", compute_dtype=compute_dtype
        )
    assert out_auto.dtype == torch.float32
    expected = compute_dtype or torch.float16
    by_hand = varlen_attention(*[t.detach().to(expected) for t in (q, k, v)], meta, backend="torch")
    torch.testing.assert_close(out_auto, by_hand.float(), rtol=0, atol=0)


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


# The order resolve_backend documents for CUDA with a half dtype: the fastest kernel first. Written out here, not
# read from the registry, so that the tests below say what the order is.
AUTO_ORDER = ("flash_attn", "torch", "sdpa")


def test_auto_picks_the_first_available_candidate(device):
    """The real registry: on CUDA with a half dtype the first available of flash_attn, torch, sdpa; else sdpa."""
    for dtype in (torch.float32, torch.bfloat16):
        if device.type == "cuda" and dtype in HALF:
            expected = next(name for name in AUTO_ORDER if name in available_backends(device))
        else:
            expected = "sdpa"
        assert resolve_backend("auto", device=device, dtype=dtype) == expected


def _fake_backend(name, *, unavailable=None, refuses=()):
    """A stand-in backend: unavailable for the given reason, or refusing the named options when they are on.

    ``calls`` records the keyword arguments of every ``attention`` call.
    """

    def unsupported(*, device, dtype, head_dim, dropout_p, window, softcap):
        asked = {"dropout_p": dropout_p, "softcap": softcap}
        refused = [f"{option}={asked[option]}" for option in refuses if asked[option]]
        return refused[0] if refused else None

    def attention(q_TNH, *args, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(q_TNH)

    calls = []
    return SimpleNamespace(
        NAME=name,
        unavailable=unavailable,
        refuses=tuple(refuses),
        calls=calls,
        unavailable_reason=lambda device: unavailable,
        unsupported=unsupported,
        attention=attention,
    )


def _fakes(**overrides):
    """Fake auto candidates, all available and refusing nothing unless ``overrides`` says otherwise."""
    return {name: _fake_backend(name, **overrides.get(name, {})) for name in AUTO_ORDER}


@st.composite
def _fake_registries(draw):
    """For each auto candidate: available or not, and which of dropout/softcap it refuses."""
    fakes = {}
    for name in AUTO_ORDER:
        unavailable = draw(st.sampled_from([None, f"{name} is fake-missing"]))
        refuses = draw(st.lists(st.sampled_from(["dropout_p", "softcap"]), unique=True))
        fakes[name] = _fake_backend(name, unavailable=unavailable, refuses=refuses)
    return fakes


@given(
    fakes=_fake_registries(),
    device_type=st.sampled_from(["cpu", "cuda"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    dropout_p=st.sampled_from([0.0, 0.1]),
    softcap=st.sampled_from([0.0, 30.0]),
)
@example(fakes=_fakes(), device_type="cuda", dtype=torch.bfloat16, dropout_p=0.0, softcap=0.0)
@example(
    fakes=_fakes(flash_attn=dict(unavailable="missing")),
    device_type="cuda",
    dtype=torch.float16,
    dropout_p=0.0,
    softcap=0.0,
)
@example(
    fakes=_fakes(flash_attn=dict(refuses=["dropout_p"])),
    device_type="cuda",
    dtype=torch.bfloat16,
    dropout_p=0.1,
    softcap=0.0,
)
@example(
    fakes=_fakes(torch=dict(refuses=["softcap"])), device_type="cuda", dtype=torch.bfloat16, dropout_p=0.0, softcap=30.0
)
@example(fakes=_fakes(), device_type="cpu", dtype=torch.bfloat16, dropout_p=0.0, softcap=0.0)
@example(fakes=_fakes(), device_type="cuda", dtype=torch.float32, dropout_p=0.0, softcap=0.0)
def test_auto_selection_over_a_fake_registry(fakes, device_type, dtype, dropout_p, softcap):
    """auto = the first candidate, in order, that is available and refuses nothing asked; the candidates are
    flash_attn, torch, sdpa on CUDA with a half dtype and sdpa alone otherwise. When none qualifies, the error
    names every available candidate's refusal and no unavailable candidate."""
    candidates = AUTO_ORDER if device_type == "cuda" and dtype in HALF else ("sdpa",)
    asked = {"dropout_p": dropout_p, "softcap": softcap}
    usable = [n for n in candidates if fakes[n].unavailable is None]
    accepting = [n for n in usable if not any(asked[option] for option in fakes[n].refuses)]
    with pytest.MonkeyPatch.context() as mp:
        for name, fake in fakes.items():
            mp.setitem(BACKENDS, name, fake)
        _registry._resolve.cache_clear()  # the cache holds answers about the real registry
        try:
            if accepting:
                assert resolve_backend("auto", device=device_type, dtype=dtype, **asked) == accepting[0]
            else:
                with pytest.raises(UnsupportedAttentionOption) as err:
                    resolve_backend("auto", device=device_type, dtype=dtype, **asked)
                message = str(err.value)
                assert all(f"{name}:" in message for name in usable)
                assert not any(f"{name}:" in message for name in set(AUTO_ORDER) - set(usable))
        finally:
            _registry._resolve.cache_clear()


@pytest.mark.parametrize(
    "lengths, causal, needs_grad, head_dim, first",
    [
        ([4096] * 8, True, False, 128, "sdpa"),  # long documents, forward only: measured 1.5x faster per segment
        ([2048] * 16, True, False, 128, "sdpa"),  # the rule's edge: a mean of exactly FORWARD_SDPA_MIN_MEAN
        ([4096] * 8, True, True, 128, "flash_attn"),  # training: no shape won consistently with a backward
        ([512] * 16, True, False, 128, "flash_attn"),  # short documents: per-segment calls measured 2x slower
        ([4096] * 8, False, False, 128, "flash_attn"),  # bidirectional: not measured
        ([4096] * 8, True, False, 80, "flash_attn"),  # a head dim not measured
    ],
)
def test_auto_puts_per_segment_sdpa_first_only_where_it_measured_faster(lengths, causal, needs_grad, head_dim, first):
    """The shape rule of ``auto`` (``_registry.FORWARD_SDPA_MIN_MEAN``): on CUDA with a half dtype, a causal forward
    without gradients over long segments, at a measured head dim, tries per-segment SDPA first; everything else
    keeps the documented order. Read from the packing's host boundaries."""
    meta = VarlenMeta.from_lengths(lengths)
    long = _registry.long_causal_forward(meta, causal=causal, needs_grad=needs_grad)
    with pytest.MonkeyPatch.context() as mp:
        for name, fake in _fakes().items():
            mp.setitem(BACKENDS, name, fake)
        _registry._resolve.cache_clear()
        try:
            chosen = resolve_backend("auto", device="cuda", dtype=torch.bfloat16, head_dim=head_dim, long_causal_forward=long)
            assert chosen == first
            assert resolve_backend("auto", device="cpu", dtype=torch.bfloat16, head_dim=head_dim, long_causal_forward=long) == "sdpa"
        finally:
            _registry._resolve.cache_clear()


def _long_forward_answers(monkeypatch) -> list[bool]:
    """What each call tells ``auto`` about the forward-only rule (``long_causal_forward``), in call order."""
    import qwenvl.attention as attention

    seen = []
    real = attention.resolve_backend
    monkeypatch.setattr(attention, "resolve_backend", lambda *a, **k: seen.append(k["long_causal_forward"]) or real(*a, **k))
    return seen


def _two_long_segments():
    """q, k, v of two 2048-token segments (the rule's threshold) and their packing."""
    return (*(torch.randn(4096, 2, 8) for _ in range(3)), VarlenMeta.from_lengths([2048, 2048]))


def test_varlen_attention_tells_auto_whether_the_call_is_a_long_forward(monkeypatch):
    """``varlen_attention`` reads the rule's inputs itself: causal, whether autograd records the call, the packing."""
    seen = _long_forward_answers(monkeypatch)
    q, k, v, meta = _two_long_segments()
    with torch.no_grad():
        varlen_attention(q, k, v, meta, causal=True)
        varlen_attention(q, k, v, meta, causal=False)
        varlen_attention(q, k, v, meta, causal=True, training=True)  # a reentrant checkpoint's first pass
    varlen_attention(q.requires_grad_(), k, v, meta, causal=True)
    varlen_attention(q, k, v, VarlenMeta.from_lengths([2048, 1024, 1024]), causal=True)
    assert seen == [True, False, False, False, False]


def test_the_compiled_operator_never_takes_the_forward_only_rule(monkeypatch):
    """The compiled operator's body runs without autograd even in training, and its backward recomputes the forward
    with gradients: both must resolve the same kernel, so the forward-only shape rule stays off there."""
    from qwenvl.attention._compiled import _eager

    seen = _long_forward_answers(monkeypatch)
    q, k, v, meta = _two_long_segments()
    with torch.no_grad():
        _eager(q, k, v, meta.cu_seqlens, meta.host_cu_seqlens, True, 0.35, -1, 0, 0.0, "auto", "")
    assert seen == [False]


@pytest.mark.parametrize("name", ["torch", "flash_attn"])
def test_refusal_is_checked_before_the_backend_runs(monkeypatch, name):
    """A named backend that refuses an option raises before its attention runs; accepted, it runs once."""
    fake = _fake_backend(name, refuses=("softcap",))
    monkeypatch.setitem(BACKENDS, name, fake)
    _registry._resolve.cache_clear()
    try:
        q, k, v, meta = _small("cpu")
        with pytest.raises(UnsupportedAttentionOption, match=rf"'{name}' does not support softcap=30.0"):
            varlen_attention(q, k, v, meta, backend=name, softcap=30.0)
        assert fake.calls == []
        varlen_attention(q, k, v, meta, backend=name)
        assert len(fake.calls) == 1
    finally:
        _registry._resolve.cache_clear()


def test_unknown_backend_lists_names(device):
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'") as err:
        resolve_backend("nope", device=device, dtype=torch.float32, dropout_p=0.0, window=(-1, -1), softcap=0.0)
    assert all(repr(name) in str(err.value) for name in ["auto", *BACKENDS])


_ATTENTION_PARAMS = [
    "q_TNH",
    "k_TKH",
    "v_TKH",
    "meta",
    "causal",
    "scale",
    "dropout_p",
    "window",
    "softcap",
    "compute_dtype",
]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_has_the_interface(name, device):
    """Every registered backend answers the registry's questions; an unavailable one says why, everywhere."""
    backend = BACKENDS[name]
    assert backend.NAME == name
    assert list(inspect.signature(backend.attention).parameters) == _ATTENTION_PARAMS
    assert (
        backend.unsupported(device=device, dtype=torch.float32, head_dim=8, dropout_p=0.0, window=(-1, -1), softcap=0.0)
        is None
    )
    why = backend.unavailable_reason(device)
    assert (name in available_backends(device)) == (why is None)
    if why is None:
        assert resolve_backend(name, device=device, dtype=torch.float32) == name
        return
    assert isinstance(why, str) and why
    q, k, v, meta = _small(device)
    # q.device names the index (cuda:0) where the fixture may not.
    with pytest.raises(ValueError, match=rf"'{name}' is not available on {device.type}(:\d+)? \({re.escape(why)}\)"):
        varlen_attention(q, k, v, meta, backend=name)


def test_backends_unavailable_on_cpu_say_so():
    assert _registry.unavailable_reason("torch", "cpu") == "torch.nn.attention.varlen needs CUDA"
    assert _registry.unavailable_reason("flash_attn", "cpu") == "flash-attn needs CUDA"
    assert available_backends("cpu") == ["sdpa", "reference"]


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
    # The backend modules themselves are imported (plain imports); what they defer is the optional package
    # and torch's varlen module, which pulls in torch._dynamo (~5 s).
    code = (
        "import sys, qwenvl, qwenvl.attention, qwenvl.reference\n"
        "assert 'qwenvl.attention._torch_varlen' in sys.modules\n"
        "bad = [m for m in ('flash_attn', 'flash_attn_interface', 'jax', 'torch.nn.attention.varlen')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
