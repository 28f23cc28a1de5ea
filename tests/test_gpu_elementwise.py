"""The eager-prefill Triton kernels (gpu_elementwise, gpu_dequant) against the torch arithmetic they
replace. Skipped without CUDA and Triton; run on the GPU machine.

RoPE and the int8/int4 expansion do the same float32 operations in the same order as the torch code
(fused multiply-add off), so they must agree to the bit. RMSNorm's sum of squares is reduced in a
different order and its rsqrt is the GPU's approximate one, so its float32 result may differ in the
last bits, and a bf16 result by one rounding step where the float32 value sits near a tie.
"""

import pytest
import torch

from ernie_cli.kernels.ops import rope_in_torch
from ernie_cli.kernels.triton import dequant as gpu_dequant
from ernie_cli.kernels.triton import elementwise as gpu_elementwise
from ernie_cli.kernels.triton import gemv as gpu_gemv
from ernie_cli.model.ernie import RMSNorm, rope_table
from ernie_cli.quant import formats

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and gpu_gemv.triton is not None), reason="needs a CUDA GPU and Triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_matches_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(2560, 1e-5).to(dtype).cuda()
    norm.weight.data = (1 + 0.1 * torch.randn(2560, generator=gen)).to(dtype).cuda()
    x = (3 * torch.randn(37, 2560, generator=gen)).to(dtype).cuda()
    y = gpu_elementwise.rms_norm(x, norm.weight, 1e-5)
    with torch.inference_mode():
        h = x.float()
        ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert y.dtype == ref.dtype
    diff = (y.float() - ref.float()).abs()
    if dtype == torch.float32:
        assert (diff <= 4e-7 * ref.abs()).all()
    else:  # at most one bf16 step (2^-7 relative) on a small share of the elements
        assert (diff <= 2.0**-7 * ref.float().abs()).all()
        assert (diff > 0).float().mean().item() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_kernel_sum_is_torchs_and_norm_as_the_norm_kernel(dtype):
    """The residual addition fused before the norm: the sum is torch's to the bit, and the norm of
    it is what the RMSNorm kernel alone gives (the same code after the same sum)."""
    gen = torch.Generator().manual_seed(3)
    weight = (1 + 0.1 * torch.randn(2560, generator=gen)).to(dtype).cuda()
    x = (3 * torch.randn(1, 37, 2560, generator=gen)).to(dtype).cuda()
    delta = torch.randn(1, 37, 2560, generator=gen).to(dtype).cuda()
    total, normed = gpu_elementwise.add_rms_norm(x, delta, weight, 1e-5)
    assert total.shape == normed.shape == x.shape
    assert torch.equal(total, x + delta)
    assert torch.equal(normed, gpu_elementwise.rms_norm(x + delta, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_mixture_rms_norm_is_the_weighted_sum_then_the_addition(dtype):
    """A MoE layer's unsummed expert outputs added in the norm's kernel: delta is sum_k p_k y_k in
    float32 rounded once to the dtype (float64 reference; float32 sums may differ in the last bit
    only), and the sum and norm are then those of add_rms_norm with that delta."""
    gen = torch.Generator().manual_seed(5)
    weight = (1 + 0.1 * torch.randn(2560, generator=gen)).to(dtype).cuda()
    x = (3 * torch.randn(1, 1, 2560, generator=gen)).to(dtype).cuda()
    y = torch.randn(8, 2560, generator=gen).to(dtype).cuda()
    p = torch.rand(8, generator=gen).to(dtype).cuda()
    total, normed = gpu_elementwise.add_mixture_rms_norm(x, y, p, weight, 1e-5)
    exact = (p.double()[:, None] * y.double()).sum(0)
    delta = (total.double() - x.double()).view(-1)  # differs from the rounded delta by the addition's rounding
    tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-20  # roundings of the sum, of delta and of x + delta
    scale = x.double().abs().view(-1) + (p.double()[:, None] * y.double()).abs().sum(0)
    assert ((delta - exact).abs() <= tol * scale).all()
    if dtype == torch.bfloat16:  # float32 sums in another order give another bf16 now and then
        rounded = (p.float()[:, None] * y.float()).sum(0).to(dtype)
        ref_total, _ = gpu_elementwise.add_rms_norm(x, rounded.view(1, 1, -1), weight, 1e-5)
        assert (total != ref_total).float().mean().item() < 0.01
    assert torch.equal(normed, gpu_elementwise.rms_norm(total, weight, 1e-5))


def test_argmax_finite_kernel_against_torch():
    """Rows of the head's width: the first of equal largest entries (torch.argmax's choice), a
    largest entry in the last partial block, and rows holding NaN, +inf or -inf flagged."""
    gen = torch.Generator().manual_seed(4)
    v = 103_424
    x = torch.randn(6, v, generator=gen)
    x[1, 7], x[1, 70_000], x[1, 90_001] = 50.0, 50.0, 50.0  # a tie across blocks and lanes
    x[2, v - 1] = 60.0
    x[3, 5] = float("nan")
    x[4, 9] = float("inf")
    x[5, 100] = float("-inf")
    for dtype in (torch.float32, torch.bfloat16):
        got = gpu_elementwise.argmax_finite(x.to(dtype).cuda()).cpu()
        ref = x.to(dtype)
        assert got[0].tolist() == torch.isfinite(ref).all(dim=-1).long().tolist() == [1, 1, 1, 0, 0, 0]
        finite = got[0].bool()
        assert torch.equal(got[1][finite], ref.argmax(dim=-1)[finite])
        assert got[1][1] == 7 and got[1][2] == v - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_is_bit_exact(dtype):
    gen = torch.Generator().manual_seed(1)
    cos, sin = rope_table(128, 500000.0, 300, "cuda")
    qkv = torch.randn(9, 20 * 128 + 2 * 4 * 128, generator=gen).to(dtype).cuda()  # q, k as strided views
    c, s = cos[250:259], sin[250:259]
    for lo, heads in ((0, 20), (2560, 4)):
        x = qkv[:, lo : lo + heads * 128].view(9, heads, 128)
        got = gpu_elementwise.rope(x, c, s)
        ref = rope_in_torch(x[None], c, s)[0]
        assert torch.equal(got, ref)


@pytest.mark.parametrize("fmt, group, k", [("int8", 0, 384), ("int4", 64, 384), ("int4", 32, 200), ("int4", 128, 320)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel_is_bit_exact(fmt, group, k, dtype):
    w = 0.02 * torch.randn(3, 70, k, generator=torch.Generator().manual_seed(2))
    disk = formats.quantize(fmt, w, group or 64)
    ref = formats.dequantize(fmt, disk, group or 64, dtype)
    cuda = {key: v.cuda() for key, v in disk.items()}
    got = gpu_dequant.dequantize(fmt, cuda["qweight"], cuda["scales"], cuda.get("zeros"), group or 64, k, dtype)
    assert torch.equal(got.cpu(), ref)
    one = gpu_dequant.dequantize(fmt, cuda["qweight"][1], cuda["scales"][1], cuda.get("zeros", [None, None])[1], group or 64, k, dtype)
    assert torch.equal(one.cpu(), ref[1])
