"""The Triton one-token GEMVs (ernie_cli/kernels/triton/gemv.py) against float64 arithmetic on the GPU.

Skipped without CUDA and Triton; run on the GPU machine with `pytest tests/test_gpu_gemv.py`.
With float32 inputs the only error is float32 summation (bound 1e-5 of sum |x||w|); with bf16
inputs the output is rounded once to bf16 (2^-8 relative).
"""

import pytest
import torch

from ernie_cli.kernels.triton import gemv as gpu_gemv
from ernie_cli.quant import formats

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and gpu_gemv.triton is not None), reason="needs a CUDA GPU and Triton")


def _weights(fmt, shape, group, seed):
    w = 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if fmt == "float":
        wt = w.to(torch.bfloat16)
        return {"weight": wt.cuda()}, wt.double()
    disk = formats.quantize(fmt, w, group)
    args = {"weight": disk["qweight"].cuda(), "scales": disk["scales"].cuda(), "zeros": disk["zeros"].cuda() if "zeros" in disk else None, "group_size": group}
    return args, formats.dequantize(fmt, disk, group, torch.float64)


def _assert_close(y, ref, x, w, rounding):
    bound = 1e-5 * (x.double().abs() @ w.abs().T) * (1 + rounding) + rounding * ref.abs() + 1e-7
    assert ((y.double().cpu() - ref).abs() <= bound).all()


FORMS = [("float", 0), ("int8", 0)] + [("int4", g) for g in (32, 64, 128)]


@pytest.mark.parametrize("fmt, group", FORMS)
@pytest.mark.parametrize("dtype, rounding", [(torch.float32, 0.0), (torch.bfloat16, 2.0**-8)])
@pytest.mark.parametrize("n, k", [(200, 392), (256, 1024)])
def test_experts_and_single_matrices_against_float64(fmt, group, dtype, rounding, n, k, monkeypatch):
    """200 x 392: N and K/8 multiples of no block, so every load is masked, and the last int4 group
    is partial; 256 x 1024: N and K multiples of every block. x stays in x's dtype (DP4A off)."""
    monkeypatch.setattr(gpu_gemv, "DP4A", False)
    e_count = 6
    args, w = _weights(fmt, (e_count, n, k), group or 64, seed=1)
    experts = torch.tensor([5, 0, 3, 3], device="cuda")
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(k, generator=gen).to(dtype)
    xs = torch.randn(4, k, generator=gen).to(dtype)
    y = gpu_gemv.gemv(fmt, x1.cuda(), experts=experts, **args)
    for p, e in enumerate(experts.tolist()):
        _assert_close(y[p], x1.double() @ w[e].T, x1, w[e], rounding)
    y = gpu_gemv.gemv(fmt, xs.cuda(), experts=experts, per_expert_x=True, **args)
    for p, e in enumerate(experts.tolist()):
        _assert_close(y[p], xs[p].double() @ w[e].T, xs[p], w[e], rounding)
    one = {key: (v[2] if isinstance(v, torch.Tensor) else v) for key, v in args.items()}
    y = gpu_gemv.gemv(fmt, x1.cuda(), **one)
    _assert_close(y[0], x1.double() @ w[2].T, x1, w[2], rounding)


def _x_as_int8(x, group):
    """x rounded as _gemv_dp4a rounds it: per group of columns, scale = max |x| / 127 in float32,
    codes = x * (127 / max |x|) to nearest-even. -> (scale per column, codes), float64."""
    k = x.shape[-1]
    g = -(-k // group)
    xp = torch.zeros(g * group)
    xp[:k] = x.float()
    gmax = xp.view(g, group).abs().amax(1)
    inv = torch.where(gmax > 0, 127.0 / gmax, torch.zeros_like(gmax))
    codes = torch.round(xp.view(g, group) * inv[:, None]).view(-1)[:k]
    return (gmax / 127.0).repeat_interleave(group)[:k].double(), codes.double()


@pytest.mark.parametrize("fmt, group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype, rounding", [(torch.float32, 0.0), (torch.bfloat16, 2.0**-8)])
@pytest.mark.parametrize("n, k", [(200, 392), (256, 1024), (37, 24)])
def test_dp4a_kernel_within_the_error_of_rounding_x_to_int8(fmt, group, dtype, rounding, n, k, monkeypatch):
    """_gemv_dp4a (ERNIE_DP4A=1) rounds x to int8 per group (the int4 group; 64 columns for int8).
    Two float64 references: the exact product, which it must meet within the worst case of that
    rounding (half a step of each column's group scale times |w|, summed); and the product with x
    replaced by its int8 codes (the zeros of int4 meet x's exact group sums), which it must meet as
    the float kernels meet theirs, plus two steps of slack for a rounding tie decided the other way."""
    monkeypatch.setattr(gpu_gemv, "DP4A", True)
    args, w = _weights(fmt, (6, n, k), group or 64, seed=3)
    zeros = None if fmt == "int8" else args["zeros"].double().cpu().repeat_interleave(group, -1)[..., :k]
    experts = torch.tensor([5, 0, 3, 3], device="cuda")
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(4, k, generator=gen).to(dtype)
    y = gpu_gemv.gemv(fmt, xs.cuda(), experts=experts, per_expert_x=True, **args).double().cpu()
    for p, e in enumerate(experts.tolist()):
        x, we = xs[p].double(), w[e]
        step, codes = _x_as_int8(xs[p], group or 64)
        exact = x @ we.T
        as_codes = (step * codes) @ we.T + (0 if zeros is None else (x - step * codes) @ zeros[e].T)
        out_rounding = rounding * torch.maximum(exact.abs(), as_codes.abs())
        summing = 1e-5 * (x.abs() @ we.abs().T) + 1e-7 + out_rounding
        assert ((y[p] - exact).abs() <= 0.5 * (we.abs() @ step) + summing).all()
        assert ((y[p] - as_codes).abs() <= 2 * (we.abs() * step).amax(1) + summing).all()


@pytest.mark.parametrize("fmt, group", [("int8", 0), ("int4", 64)])
@pytest.mark.parametrize("n, k", [(200, 392), (256, 1536)])
def test_dp4a_kernel_forms_silu_gate_times_up_itself(fmt, group, n, k, monkeypatch):
    """swiglu=True: x is [gate, up] per expert and the kernel's input is silu(gate) * up (float64
    here), held to the same two bounds as above."""
    monkeypatch.setattr(gpu_gemv, "DP4A", True)
    monkeypatch.setattr(gpu_gemv, "SWIGLU_IN_DOWN", True)
    args, w = _weights(fmt, (6, n, k), group or 64, seed=5)
    zeros = None if fmt == "int8" else args["zeros"].double().cpu().repeat_interleave(group, -1)[..., :k]
    experts = torch.tensor([1, 4, 4], device="cuda")
    gu = torch.randn(3, 2 * k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    y = gpu_gemv.gemv(fmt, gu.cuda(), experts=experts, per_expert_x=True, swiglu=True, **args).double().cpu()
    for p, e in enumerate(experts.tolist()):
        gate, up = gu[p].double().chunk(2)
        x, we = torch.nn.functional.silu(gate) * up, w[e]
        step, codes = _x_as_int8(x, group or 64)
        exact = x @ we.T
        as_codes = (step * codes) @ we.T + (0 if zeros is None else (x - step * codes) @ zeros[e].T)
        summing = 1e-5 * (x.abs() @ we.abs().T) + 1e-7 + 2.0**-8 * torch.maximum(exact.abs(), as_codes.abs())
        assert ((y[p] - exact).abs() <= 0.5 * (we.abs() @ step) + summing).all()
        assert ((y[p] - as_codes).abs() <= 2 * (we.abs() * step).amax(1) + summing).all()


@pytest.mark.parametrize("dtype, rounding", [(torch.float32, 0.0), (torch.bfloat16, 2.0**-8)])
@pytest.mark.parametrize("n, k", [(200, 392), (256, 1536)])
def test_float_kernel_forms_silu_gate_times_up_itself(dtype, rounding, n, k):
    """The float weights' down product with swiglu=True (the captured decode step): the input
    silu(gate) * up is formed in float32 while loading, never rounded, so the float64 product of the
    exact silu(gate) * up bounds it as the plain product is bounded."""
    args, w = _weights("float", (6, n, k), 0, seed=7)
    if dtype == torch.float32:
        args["weight"] = args["weight"].float()
    experts = torch.tensor([2, 5, 2], device="cuda")
    gu = torch.randn(3, 2 * k, generator=torch.Generator().manual_seed(8)).to(dtype)
    y = gpu_gemv.gemv("float", gu.cuda(), experts=experts, per_expert_x=True, swiglu=True, **args)
    assert y.dtype == dtype
    for p, e in enumerate(experts.tolist()):
        gate, up = gu[p].double().chunk(2)
        x = torch.nn.functional.silu(gate) * up
        _assert_close(y[p], x @ w[e].T, x, w[e], rounding)


def test_float32_weight_gives_float32_output_from_bf16_x():
    """The router's logits in the captured step: a float32 [E, H] weight against a bf16 token, out in
    float32 (out_dtype), within float32 summation of the float64 product (no bf16 rounding)."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(64, 2560, generator=gen)
    x = torch.randn(2560, generator=gen).to(torch.bfloat16)
    y = gpu_gemv.gemv("float", x.cuda(), w.cuda(), block=(4, 512), out_dtype=torch.float32)
    assert y.dtype == torch.float32 and y.shape == (1, 64)
    _assert_close(y[0], x.double() @ w.double().T, x, w.double(), 0.0)


@pytest.mark.parametrize("p, h", [(8, 2560), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_of_expert_outputs_against_float64(p, h, dtype):
    """elementwise.weighted_sum: sum_p w_p y_p in float32, rounded once to the output dtype."""
    from ernie_cli.kernels.triton import elementwise

    gen = torch.Generator().manual_seed(p)
    y, w = torch.randn(p, h, generator=gen).to(dtype), torch.rand(p, generator=gen).to(dtype)
    out = elementwise.weighted_sum(y.cuda(), w.cuda(), dtype)
    ref = (w.double()[:, None] * y.double()).sum(0)
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    bound = 1e-6 * (w.double().abs()[:, None] * y.double().abs()).sum(0) + rounding * ref.abs() + 1e-7
    assert out.shape == (1, h) and out.dtype == dtype
    assert ((out[0].double().cpu() - ref).abs() <= bound).all()


@pytest.mark.parametrize("experts, k, always", [(64, 6, 0), (64, 6, 2), (8, 2, 0), (5, 3, 1)])
def test_router_kernel_picks_and_weighs_like_torch(experts, k, always):
    """gpu_router against the float32 torch arithmetic of model.Router: the same experts in the same
    (descending) order, weights within 2e-6 relative of float64: a few float32 roundings (sums,
    divisions) and the GPU's fast exp (2 ulps) on each of the 64 probabilities. always: the shared
    experts in the stack follow, as experts E.. at weight 1, and do not enter the renormalisation."""
    from ernie_cli.kernels.triton import router as gpu_router

    gen = torch.Generator().manual_seed(experts)
    logits = torch.randn(33, experts, generator=gen)
    bias = 0.01 * torch.randn(experts, generator=gen)
    w, idx = gpu_router.route(logits.cuda(), bias.cuda(), k, 1e-12, torch.float32, always)
    probs = torch.softmax(logits.double(), -1)
    _, ref_idx = torch.topk(probs + bias.double(), k, dim=-1)
    ref_w = probs.gather(-1, ref_idx)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert idx.shape == w.shape == (33, k + always)
    assert torch.equal(idx[:, :k].cpu(), ref_idx)
    assert ((w[:, :k].double().cpu() - ref_w).abs() <= 2e-6 * ref_w.abs()).all()
    assert torch.equal(idx[:, k:].cpu(), torch.arange(experts, experts + always).expand(33, -1))
    assert torch.equal(w[:, k:].cpu(), torch.ones(33, always))


@pytest.mark.parametrize("kernel", ["_gemv", "_gemv_dp4a"])
def test_torch_compile_sees_only_the_output_written(kernel):
    """torch.compile copies, before each launch, every tensor its analysis of a Triton kernel finds
    written. The GEMVs write only out. The expert ids idx, which they only read, used to count as
    written: the decode graph then copied them before every expert GEMV, two kernels a MoE layer
    (8.3% of a bf16 step). The analysis is torch's own, on the kernel as the graph launches it."""
    fn = getattr(gpu_gemv, kernel)
    while not isinstance(fn, gpu_gemv.triton.runtime.jit.JITFunction):  # the autotuner and heuristics wrappers
        fn = fn.fn
    t = lambda *shape, dtype=torch.bfloat16: torch.empty(shape, dtype=dtype, device="cuda")  # noqa: E731
    common = dict(x_ptr=t(8, 256), x_slot_stride=256, idx_ptr=t(8, dtype=torch.int64), s_ptr=t(5, 64, 4), z_ptr=t(5, 64, 4),
                  out_ptr=t(8, 64), N=64, P=8, w_expert_stride=64 * 256, s_expert_stride=256, w_row_stride=256, s_row_stride=4,
                  HAS_IDX=True, BLOCK_N=16, PDL=False)
    if kernel == "_gemv":
        args = dict(common, w_ptr=t(5, 64, 256), K=256, FMT=0, GROUP=64, BLOCK_K=128, SWIGLU=False)
    else:
        args = dict(common, w_ptr=t(5, 64, 32, dtype=torch.int32), KW=32, FMT=2, GROUP_WORDS=8, BLOCK_W=32, EVEN_N=True,
                    EMULATE=False, SWIGLU=False)
    assert _written_by(fn, args) == {"out_ptr"}, _written_by(fn, args)


def _written_by(fn, args) -> set[str]:
    """The arguments torch.compile takes the kernel to write. On an error in its analysis, torch
    takes every tensor for written, so a broken analysis fails the test rather than passing it."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    if hasattr(wrap, "identify_accessed_tensors"):  # torch 2.12 on
        return {d.name for d in wrap.identify_accessed_tensors(fn, args, {}).read_writes.writes}
    return set(wrap.identify_mutated_tensors(fn, args, {}))  # torch 2.11, the device's
