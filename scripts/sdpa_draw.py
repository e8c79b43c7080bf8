"""The float32 SDPA draw that fails the rule on H100/H200 (docs/gpu-parity.md): one segment of 12 tokens, non-causal
window (0, 0), run under each SDPA kernel to name the one that is 2 ulps off. CUDA only.

    python scripts/sdpa_draw.py
"""

import sys
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, "parity_tests")
from strategies import AttnCase  # noqa: E402
from qwenvl.attention import varlen_attention  # noqa: E402
from qwenvl.packing import VarlenMeta  # noqa: E402
from qwenvl.reference import attention_ref, attention_ref_flash_out, mask_from_cu_seqlens  # noqa: E402

case = AttnCase(lengths=(12,), n_heads=4, kv_heads=4, head_dim=8, causal=False, window=(0, 0))
dev = torch.device("cuda")
q, k, v, _ = case.tensors(torch.float32, dev)
meta = VarlenMeta.from_lengths(case.lengths, device=dev)
mask = mask_from_cu_seqlens(meta.cu_seqlens, causal=False, window=(0, 0))
ref = attention_ref(*(t.double() for t in (q, k, v)), mask).double()
plain = attention_ref(q, k, v, mask, upcast=False)
flash_style = attention_ref_flash_out(q, k, v, mask)
for name, t in (("plain softmax", plain), ("flash-style", flash_style)):
    print("yardstick", name, "err", (t.double() - ref).abs().max().item())
print("max|ref|", ref.abs().max().item(), "max|v - ref|", (v.double() - ref).abs().max().item())
for name in ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", None):
    try:
        ctx = sdpa_kernel([getattr(SDPBackend, name)]) if name else torch.no_grad()
        with ctx:
            out = varlen_attention(q, k, v, meta, backend="sdpa", causal=False, window=(0, 0))
        print(name or "default", "err", (out.double() - ref).abs().max().item())
    except Exception as e:
        print(name, "failed", type(e).__name__, str(e)[:120])
print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
