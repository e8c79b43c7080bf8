"""JAX interop: the golden attention inputs, read with numpy, through the JAX reference attention with the packed
masks, match the torch reference, on CPU and on CUDA.

fixtures/golden/<family>.safetensors holds one text layer's and one vision block's ``q (T, N, H)``, ``k, v
(T, K, H)`` as the patched packed forward handed them to the varlen core, their ``cu_seqlens`` (the vision one is
the tower's own: per frame, or per window for Qwen2.5-VL's windowed blocks), ``window``, ``causal``, ``scale``,
and the float64 output of ``qwenvl.reference.attention_ref`` on them (``out_ref``) with its float32 twin
(``out_pt``, the yardstick). This is the check a JAX port of a Qwen-VL model makes against our fixtures (README,
"JAX interop"). With ``--device cuda`` the torch reference runs on the GPU, and JAX on its GPU when it has one.

Runs in ``nox -s jax`` (and ``nox -s gpu``); skipped where JAX is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenvl.reference import attention_ref, mask_from_cu_seqlens
from qwenvl.tolerances import judge, tolerance
from qwenvl.verify import golden

jax = pytest.importorskip("jax", reason="the JAX reference needs the jax extra (nox -s jax)")

from qwenvl.reference.jax_attention import attention_ref_jax, mask_from_cu_seqlens_jax  # noqa: E402

MANIFEST = golden.load_manifest()


def _arrays(family: str) -> dict[str, np.ndarray]:
    """The family's golden tensors as numpy arrays: no torch involved in reading them."""
    from safetensors.numpy import load_file

    entry = MANIFEST["families"][family]
    assert golden._check_files(entry, golden.golden_dir()) is None
    return load_file(golden.golden_dir() / entry["tensors"])


def _jax_device(device: torch.device):
    if device.type == "cuda":
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if gpus:
            return gpus[0]
    return jax.devices("cpu")[0]


@pytest.mark.parametrize("which", ["text", "vision"])
@pytest.mark.parametrize("family", sorted(MANIFEST["families"]))
def test_golden_attention_through_jax_matches_torch(family, which, device):
    arrays = _arrays(family)
    p = f"attn.{which}"
    if f"{p}.q" not in arrays:
        pytest.skip(f"{family} records no {which} attention")
    q, k, v = arrays[f"{p}.q"], arrays[f"{p}.k"], arrays[f"{p}.v"]
    cu = arrays[f"{p}.cu_seqlens"]
    window = tuple(int(w) for w in arrays[f"{p}.window"])
    causal = bool(arrays[f"{p}.causal"][0])
    scale = float(arrays[f"{p}.scale"][0])
    assert q.dtype == np.float32 and cu.dtype == np.int32 and int(cu[-1]) == q.shape[0]

    # JAX: the mask from the boundaries, the attention in float32, every array on one JAX device (its GPU under
    # --device cuda when it has one); "highest" keeps GPU matmuls out of TF32.
    jax_device = _jax_device(device)
    with jax.default_device(jax_device), jax.default_matmul_precision("highest"):
        q_j, k_j, v_j, cu_j = (jax.device_put(a, jax_device) for a in (q, k, v, cu))
        mask_j = mask_from_cu_seqlens_jax(cu_j, causal=causal, window=window)
        out_j = attention_ref_jax(q_j, k_j, v_j, mask_j, scale=scale)
        assert out_j.devices() == {jax_device}
        mask_jax, out_jax = np.array(mask_j), np.array(out_j)

    # torch, on the test device: the same reference, its mask built another way (segment ids).
    q_t, k_t, v_t = (torch.from_numpy(a).to(device) for a in (q, k, v))
    mask_t = mask_from_cu_seqlens(torch.from_numpy(cu).to(device), causal=causal, window=window)
    out_torch = attention_ref(q_t, k_t, v_t, mask_t, scale=scale).cpu()
    out64 = attention_ref(q_t.double(), k_t.double(), v_t.double(), mask_t, scale=scale).cpu()

    assert np.array_equal(mask_jax, mask_t.cpu().numpy())
    ref, yardstick = torch.from_numpy(arrays[f"{p}.out_ref"]), torch.from_numpy(arrays[f"{p}.out_pt"])
    torch.testing.assert_close(out64, ref, rtol=0, atol=1e-12)  # the recorded oracle reproduces here
    tol = tolerance(device, torch.float32)
    for name, out in (("jax", torch.from_numpy(out_jax)), ("torch", out_torch)):
        verdict = judge(out, ref, yardstick, k=tol.k_out)
        assert verdict.passed, f"{family} {which} {name}: {verdict.err:.3e} > {verdict.bound:.3e} ({verdict.how})"
    # And JAX against torch directly, by the same rule.
    assert judge(torch.from_numpy(out_jax), out64, out_torch, k=tol.k_out).passed


def test_the_packed_mask_is_not_one_block():
    # The recorded text attention spans several samples, so a mask that ignored cu_seqlens would be caught above.
    arrays = _arrays("qwen2_vl")
    cu = arrays["attn.text.cu_seqlens"]
    assert len(cu) - 1 >= 3
    mask = np.asarray(mask_from_cu_seqlens_jax(cu, causal=True))
    assert not mask[int(cu[1]), 0] and mask[int(cu[1]), int(cu[1])]
