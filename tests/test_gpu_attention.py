"""The decode attention kernels (ernie_cli/gpu_attention.py) against float64 arithmetic and against
the masked SDPA the decode graph used before them.

Skipped without CUDA and Triton; run on the GPU machine with `pytest tests/test_gpu_attention.py`.
Slots past the filled length hold NaN, so a kernel that reads one fails. bf16 inputs: the kernel
rounds the softmax weights to bf16 before the product with V (as flash attention does), so the
bound is 2^-8 of sum_j p_j |v_j|, plus the output's own rounding (2^-8 relative), plus float32 sums.
"""

import pytest
import torch
import torch.nn.functional as F

from ernie_cli import gpu_attention

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and gpu_attention.triton is not None), reason="needs a CUDA GPU and Triton")


def _reference(q, k, v, length, scale):
    heads, kv = q.shape[1], k.shape[1]
    group = heads // kv
    out = torch.empty(heads, q.shape[-1], dtype=torch.float64)
    spread = torch.empty_like(out)  # sum_j p_j |v_j|: what rounding the weights p_j can move
    for h in range(heads):
        keys, values = k[0, h // group, :length].double(), v[0, h // group, :length].double()
        weights = torch.softmax(keys @ q[0, h, 0].double() * scale, 0)
        out[h], spread[h] = weights @ values, weights @ values.abs()
    return out, spread


@pytest.mark.parametrize("heads, kv, dim", [(20, 4, 128), (8, 2, 64), (16, 16, 64)])
@pytest.mark.parametrize("capacity, length", [(256, 1), (256, 64), (256, 65), (512, 300), (8448, 8193)])
def test_decode_attention_against_float64_and_sdpa(heads, kv, dim, capacity, length):
    """Lengths: one key; exactly one block; one past a block; 16 uneven stretches; 8k context."""
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, heads, 1, dim, generator=gen).bfloat16()
    k = torch.randn(1, kv, capacity, dim, generator=gen).bfloat16()
    v = torch.randn(1, kv, capacity, dim, generator=gen).bfloat16()
    filled_k, filled_v = k.clone(), v.clone()
    k[:, :, length:], v[:, :, length:] = float("nan"), float("nan")
    scale = dim**-0.5
    pos = torch.tensor([length - 1], device="cuda")
    assert gpu_attention.usable(q.cuda(), k.cuda())
    out = gpu_attention.decode(q.cuda(), k.cuda(), v.cuda(), pos, scale)[0, :, 0].double().cpu()
    ref, spread = _reference(q, k, v, length, scale)
    bound = 2.0**-8 * (spread + ref.abs()) + 1e-5
    assert ((out - ref).abs() <= bound).all()
    mask = (torch.arange(capacity, device="cuda") < length)[None, :]
    sdpa = F.scaled_dot_product_attention(q.cuda(), filled_k.cuda(), filled_v.cuda(), attn_mask=mask, scale=scale, enable_gqa=True)
    assert ((out - sdpa[0, :, 0].double().cpu()).abs() <= 2 * bound).all()
