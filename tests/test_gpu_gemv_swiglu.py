"""gpu_gemv's float kernel forming silu(gate) * up while it loads x (swiglu=True), for bf16 and int8
weights with x kept in floats, against float64.

On the GPU: `pytest tests/test_gpu_gemv_swiglu.py`. On the CPU under the Triton interpreter:
`DEVICE=cpu TRITON_INTERPRET=1 pytest tests/test_gpu_gemv_swiglu.py` (fp16 and float32; the
interpreter's numpy has no bf16). The dp4a kernel's SwiGLU is tested in tests/test_gpu_gemv.py.
"""

import os

import pytest
import torch

from ernie_cli import gpu_gemv
from ernie_cli.quant import formats

DEVICE = os.environ.get("DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    gpu_gemv.triton is None or (DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="needs a CUDA GPU and Triton (or TRITON_INTERPRET=1 with DEVICE=cpu)",
)
DTYPES = [(torch.float32, 0.0), (torch.float16, 2.0**-11)] + ([(torch.bfloat16, 2.0**-8)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("fmt", ["float", "int8"])
@pytest.mark.parametrize("dtype, eps", DTYPES)
@pytest.mark.parametrize("n, k", [(200, 392), (64, 1536)])
@pytest.mark.parametrize("block", [(16, 256), (8, 128)])
def test_float_kernel_forms_silu_gate_times_up_itself(fmt, dtype, eps, n, k, block, monkeypatch):
    """x is [gate, up] per selected expert. The kernel's input is silu(gate) * up rounded once to x's
    dtype, as the graph's separate kernel wrote it. So the reference rounds it the same way; then
    float32 sums (1e-5 of sum |x||w|) and the output's rounding. 200 x 392: no block divides N or K,
    so every load is masked."""
    monkeypatch.setattr(gpu_gemv, "DP4A", False)
    monkeypatch.setattr(gpu_gemv, "SWIGLU_IN_DOWN", True)
    w = 0.02 * torch.randn(5, n, k, generator=torch.Generator().manual_seed(n + k))
    if fmt == "float":
        weight = w.to(dtype)
        args, wd = {"weight": weight.to(DEVICE)}, weight.double()
    else:
        disk = formats.quantize("int8", w, 64)
        args = {"weight": disk["qweight"].to(DEVICE), "scales": disk["scales"].to(DEVICE)}
        wd = formats.dequantize("int8", disk, 64, torch.float64)
    experts = torch.tensor([4, 0, 4], device=DEVICE)
    gu = torch.randn(3, 2 * k, generator=torch.Generator().manual_seed(9)).to(dtype)
    calls = []
    real_silu = torch.nn.functional.silu
    monkeypatch.setattr(torch.nn.functional, "silu", lambda *a, **kw: calls.append(1) or real_silu(*a, **kw))
    y = gpu_gemv.gemv(fmt, gu.to(DEVICE), experts=experts, per_expert_x=True, swiglu=True, block=block, **args)
    assert not calls  # formed inside the kernel, not by torch first
    y = y.double().cpu()
    for p, e in enumerate(experts.tolist()):
        gate, up = gu[p].float().chunk(2)
        x = (gate * torch.sigmoid(gate) * up).to(dtype).double()
        ref = x @ wd[e].T
        bound = 1e-5 * (x.abs() @ wd[e].abs().T) + eps * ref.abs() + 1e-6
        assert ((y[p] - ref).abs() <= bound).all(), p


def test_int4_float_kernels_get_it_from_torch(monkeypatch):
    """The int4 float kernels have no SwiGLU of their own: gemv forms silu(gate) * up with torch first,
    and the product is the same as with that input given directly."""
    monkeypatch.setattr(gpu_gemv, "DP4A", False)
    n, k = 64, 256
    disk = formats.quantize("int4", 0.02 * torch.randn(3, n, k, generator=torch.Generator().manual_seed(1)), 64)
    args = {"weight": disk["qweight"].to(DEVICE), "scales": disk["scales"].to(DEVICE), "zeros": disk["zeros"].to(DEVICE), "group_size": 64}
    experts = torch.tensor([2, 1], device=DEVICE)
    gu = torch.randn(2, 2 * k, generator=torch.Generator().manual_seed(2)).to(torch.float16).to(DEVICE)
    gate, up = gu.chunk(2, dim=-1)
    x = (torch.nn.functional.silu(gate) * up).contiguous()
    got = gpu_gemv.gemv("int4", gu, experts=experts, per_expert_x=True, swiglu=True, block=(16, 128), **args)
    want = gpu_gemv.gemv("int4", x, experts=experts, per_expert_x=True, block=(16, 128), **args)
    assert torch.equal(got, want)
