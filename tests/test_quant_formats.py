"""int8/int4 math, packing and the CPU kernels' layouts, checked against float64 references."""

import pytest
import torch

from ernie_cli.kernels import quantized
from ernie_cli.quant import formats
from ernie_cli.quant.weight import QuantWeight


def _weights(shape, seed=0, heavy=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    if heavy:  # Student-t-like tails, closer to real LLM weights than a Gaussian
        w = w / torch.rand(shape, generator=gen).clamp(min=0.05).sqrt()
    return (0.02 * w).to(torch.bfloat16)


def _rel_mse(w, deq):
    ref = w.double()
    return (((deq.double() - ref) ** 2).mean() / (ref**2).mean()).item()


# ---- int8 ------------------------------------------------------------------------------------------


def test_int8_round_trip_error_is_within_half_a_step():
    w = _weights((96, 256))
    q, s = formats.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (96,)
    assert q.abs().max() <= 127
    err = (q.double() * s.double()[:, None] - w.double()).abs()
    # Round to nearest: at most half a step, also where the bf16 scale rounded down and 127 clamps.
    assert (err <= 0.5 * s.double()[:, None] + 1e-12).all()
    # Uniform rounding error of variance s^2/12 with s = amax/127 ~ 4.5 sigma/127 for 256 Gaussians:
    # relative MSE ~ 1.0e-4; the bound leaves 50% for the spread of amax.
    assert _rel_mse(w, formats.dequantize_int8(q, s, torch.float64)) < 1.6e-4


def test_int8_zero_rows_and_stacks():
    w = _weights((3, 8, 32))
    w[1, 2] = 0
    q, s = formats.quantize_int8(w)
    assert q.shape == (3, 8, 32) and s.shape == (3, 8)
    assert (q[1, 2] == 0).all()
    assert torch.equal(formats.dequantize_int8(q, s)[1, 2], torch.zeros(32))


# ---- int4 ------------------------------------------------------------------------------------------


def test_pack_int4_element_by_element():
    codes = torch.randint(0, 16, (5, 3, 40), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = formats.pack_int4(codes)
    assert packed.shape == (5, 3, 20) and packed.dtype == torch.uint8
    for idx in range(20):
        assert torch.equal(packed[..., idx], codes[..., 2 * idx] + 16 * codes[..., 2 * idx + 1])
    assert torch.equal(formats.unpack_int4(packed), codes)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_rtn_codes_and_error_bound(group):
    w = _weights((64, 256), seed=group)
    packed, s, z = formats.quantize_int4(w, group, steps=0)
    assert packed.shape == (64, 128) and s.shape == z.shape == (64, 256 // group)
    codes = formats.unpack_int4(packed).double()
    s64 = formats.expand_groups(s.double(), group, 256)
    z64 = formats.expand_groups(z.double(), group, 256)
    # The stored codes are round-to-nearest against the stored bf16 scale and zero, element by element.
    ideal = ((w.double() - z64) / s64 + 8).clamp(0, 15)
    assert ((codes - ideal).abs() <= 0.5 + 1e-6).all()
    # dequantize = (code - 8) * scale + zero, and the error stays near half a step.
    deq = formats.dequantize_int4(packed, s, z, group, torch.float64)
    assert torch.allclose(deq, (codes - 8) * s64 + z64, atol=1e-7)
    assert ((deq - w.double()).abs() <= 0.55 * s64 + 1e-9).all()


@pytest.mark.parametrize("group, bound", [(32, 0.0056), (64, 0.0075), (128, 0.0095)])
def test_int4_refinement_lowers_the_error(group, bound):
    """Each refinement step is a least-squares fit, so the error can only go down; the bounds are the
    measured relative MSE of 4 steps on Gaussian rows (0.0053 / 0.0071 / 0.0090) plus 5%."""
    w = _weights((256, 512), seed=3)
    errors = [_rel_mse(w, formats.dequantize("int4", formats.quantize("int4", w, group, steps), group, torch.float64)) for steps in range(5)]
    assert all(b <= a * 1.002 for a, b in zip(errors, errors[1:]))  # bf16 rounding of the final params
    assert errors[4] < 0.92 * errors[0]  # at least 8% below round-to-nearest
    assert errors[4] < bound


def test_int4_heavy_tailed_weights_gain_from_refinement():
    w = _weights((256, 512), seed=4, heavy=True)
    rtn = _rel_mse(w, formats.dequantize("int4", formats.quantize("int4", w, 64, 0), 64, torch.float64))
    refined = _rel_mse(w, formats.dequantize("int4", formats.quantize("int4", w, 64, 4), 64, torch.float64))
    assert refined < 0.92 * rtn


def test_int4_partial_last_group_and_constant_groups():
    w = _weights((6, 40), seed=5)  # 40 = one group of 32 and a last group of 8
    w[2, :32] = 0.5  # a constant group
    packed, s, z = formats.quantize_int4(w, 32)
    assert s.shape == (6, 2)
    deq = formats.dequantize_int4(packed, s, z, 32, torch.float64)
    assert torch.allclose(deq[2, :32], torch.full((32,), 0.5, dtype=torch.float64), atol=2e-3)
    assert _rel_mse(w[:, 32:], deq[:, 32:]) < 0.01


def test_quantized_shapes_match_what_quantize_makes():
    for fmt in ("int8", "int4"):
        w = _weights((4, 24, 48))
        made = formats.quantize(fmt, w, 32)
        planned = formats.quantized_shapes(fmt, (4, 24, 48), 32)
        assert {k: (tuple(v.shape), v.dtype) for k, v in made.items()} == planned
        assert formats.quantized_nbytes(fmt, (4, 24, 48), 32) == sum(v.numel() * v.element_size() for v in made.values())


# ---- the CPU kernels against the float64 reference -----------------------------------------------------


def _check_mm(weight: QuantWeight, disk: dict, x: torch.Tensor, expert=None):
    fmt, g = weight.fmt, weight.group_size
    ref_w = formats.dequantize(fmt, {k: (v if expert is None else v[expert]) for k, v in disk.items()}, g, torch.float64)
    y = quantized.matmul(weight, x, expert).double()
    ref = x.double() @ ref_w.T
    # bf16 activations (relative 2^-9 each) and a bf16 output: bounded by 2^-8 of sum |x||w|.
    bound = 4e-3 * (x.double().abs() @ ref_w.abs().T) + 1e-6
    assert ((y - ref).abs() <= bound).all()


@pytest.mark.parametrize("fmt, group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("out_features, in_features", [(48, 128), (24, 24), (40, 160), (128, 256)])  # padded when not aligned; 128 rows: the shuffled fast path
def test_cpu_kernels_match_the_reference(fmt, group, out_features, in_features):
    w = _weights((out_features, in_features), seed=out_features)
    disk = formats.quantize(fmt, w, group or 64)
    weight = QuantWeight(fmt, w.shape, group or 64, "cpu").load(disk, torch.device("cpu"))
    for m in (1, 5):
        _check_mm(weight, disk, torch.randn(m, in_features, generator=torch.Generator().manual_seed(m)))
    # The runtime layout read back through the kernel, element by element.
    deq = formats.dequantize(fmt, disk, group or 64, torch.float64)
    back = weight.dequantize(None, torch.float64)
    assert back.shape == deq.shape
    assert ((back - deq).abs() <= 4e-3 * deq.abs() + 1e-7).all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_stacked_experts_keep_each_expert(fmt):
    w = _weights((4, 32, 64), seed=9)
    disk = formats.quantize(fmt, w, 32)
    for backend in ("cpu", "dequant"):
        weight = QuantWeight(fmt, w.shape, 32, backend).load(disk, torch.device("cpu"))
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
        for e in range(4):
            _check_mm(weight, disk, x, e)


def test_int4_cpu_layout_shuffle_equals_torchs_converter():
    """The load-time byte shuffle (from the disk layout, and from codes) against torch's own converter."""
    from ernie_cli.quant.weight import _cpu_block, _repack_disk_bytes, cpu_int4_pack

    codes = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    ref = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)
    assert torch.equal(cpu_int4_pack(codes), ref)
    if _cpu_block():
        assert torch.equal(_repack_disk_bytes(formats.pack_int4(codes), _cpu_block()), ref)
