"""The decode attention kernels (ernie_cli/kernels/triton/attention.py) against float64 arithmetic and against
the masked SDPA the decode graph used before them.

Skipped without CUDA and Triton; run on the GPU machine with `pytest tests/test_gpu_attention.py`.
Slots past the filled length hold NaN, so a kernel that reads one fails. bf16 inputs: the kernel
rounds the softmax weights to bf16 before the product with V (as flash attention does), so the
bound is 2^-8 of sum_j p_j |v_j|, plus the output's own rounding (2^-8 relative), plus float32 sums.
"""

import pytest
import torch
import torch.nn.functional as F

from ernie_cli.kernels.triton import attention as gpu_attention

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
@pytest.mark.parametrize("capacity, length", [(256, 1), (256, 64), (256, 65), (512, 300), (1024, 1024), (8448, 8193)])
def test_decode_attention_against_float64_and_sdpa(heads, kv, dim, capacity, length):
    """Lengths: one key; exactly one block; one past a block; 16 uneven stretches; 16 full ones; 8k context."""
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


class _Step(torch.nn.Module):
    """The decode step's use of the kernels: write the new key and value at pos, attend to 0..pos."""

    def __init__(self, kv, capacity, dim):
        super().__init__()
        self.register_buffer("k", torch.full((1, kv, capacity, dim), float("nan"), dtype=torch.bfloat16))
        self.register_buffer("v", torch.full((1, kv, capacity, dim), float("nan"), dtype=torch.bfloat16))

    def forward(self, q, k_new, v_new, pos):
        self.k.index_copy_(2, pos, k_new)
        self.v.index_copy_(2, pos, v_new)
        return gpu_attention.decode(q, self.k, self.v, pos, q.shape[-1] ** -0.5)


def test_compiled_step_reads_the_length_from_the_position_tensor():
    """Compiled as generate.Decoder compiles the model's step (one CUDA graph, replayed with a new
    position each token): the graph must read the filled length from pos, not keep the first one.
    Round 40 found the decode graph failing to compile while the eager tests above passed."""
    heads, kv, dim, capacity, steps = 20, 4, 128, 256, 70
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(steps, 1, heads, 1, dim, generator=gen).bfloat16()
    k = torch.randn(steps, 1, kv, 1, dim, generator=gen).bfloat16()
    v = torch.randn(steps, 1, kv, 1, dim, generator=gen).bfloat16()
    step = _Step(kv, capacity, dim).cuda()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    for t in range(steps):
        pos.fill_(t)
        out = compiled(q[t].cuda(), k[t].cuda(), v[t].cuda(), pos)[0, :, 0].double().cpu()
        ref, spread = _reference(q[t], torch.cat(list(k[: t + 1]), 2), torch.cat(list(v[: t + 1]), 2), t + 1, dim**-0.5)
        assert ((out - ref).abs() <= 2.0**-8 * (spread + ref.abs()) + 1e-5).all(), f"step {t}"
