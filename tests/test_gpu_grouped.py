"""gpu_grouped's expert products against float64, on the GPU (run there with
`pytest tests/test_gpu_grouped.py`; on the CPU they run under TRITON_INTERPRET=1 with a Triton that
has the interpreter, as `DEVICE=cpu TRITON_INTERPRET=1 pytest tests/test_gpu_grouped.py`)."""

import functools
import os

import pytest
import torch

from ernie_cli.kernels.triton import grouped as gpu_grouped

DEVICE = os.environ.get("DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    gpu_grouped.triton is None or (DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="needs a CUDA GPU and Triton (or TRITON_INTERPRET=1 with DEVICE=cpu)",
)


def _sorted_rows(counts, k_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(int(ends[-1]), k_dim, generator=gen).to(dtype)
    return x, ends


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("block", [None, (64, 64, 64), (64, 32, 32)])
@pytest.mark.parametrize("n, k", [(96, 80), (64, 256)])
def test_rows_of_each_expert_times_its_weight(dtype, eps, swiglu, block, n, k):
    """Experts with no rows, with fewer rows than BLOCK_M, and with more (two passes); N and K not
    multiples of the blocks (masks). float64 reference; the bound is float32 sums over K and one
    rounding of the output (the inputs' rounding is already in x and w, exact in float64)."""
    if DEVICE != "cuda" and (block is None or dtype == torch.bfloat16):
        pytest.skip("the tuner times kernels, and the interpreter's numpy has no bf16: GPU only")
    counts = [5, 0, 70, 1, 130, 0]
    x, ends = _sorted_rows(counts, k, dtype, seed=n + k)
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(len(counts), 2 * n if swiglu else n, k, generator=gen) / k**0.5).to(dtype)
    y = gpu_grouped.grouped(x.to(DEVICE), w.to(DEVICE), ends.to(DEVICE), swiglu=swiglu, block=block).cpu()
    assert y.shape == (x.shape[0], n) and y.dtype == dtype
    start = 0
    for e, end in enumerate(ends.tolist()):
        xe, we = x[start:end].double(), w[e].double()
        ref = xe @ we.T
        if swiglu:
            gate, up = ref[:, :n], ref[:, n:]
            ref = torch.nn.functional.silu(gate) * up
        summing = 1e-5 * (xe.abs() @ we.abs().T)
        if swiglu:
            summing = summing[:, :n] * up.abs() + summing[:, n:] * gate.abs() + summing[:, :n] * summing[:, n:]
        assert ((y[start:end].double() - ref).abs() <= eps * ref.abs() + summing + 1e-6).all(), e
        start = end


@pytest.mark.parametrize("always", [0, 2])
def test_prefill_experts_through_the_kernels(always, monkeypatch):
    """ops.run_grouped_mm (the prefill's MoE) on these kernels against transformers' order of
    work in float64 (ops.run_grouped, one expert at a time): 40 tokens, top 4 of 6 experts, and
    with always=2 two more experts every token takes at weight 1 (the shared experts in the stack).
    fp16 so that the interpreter can run it; the bound is the two products' roundings."""
    from ernie_cli.kernels import ops

    if DEVICE != "cuda":  # the interpreter: no tuner
        monkeypatch.setattr(gpu_grouped, "usable", lambda x: True)
        monkeypatch.setattr(gpu_grouped, "grouped", functools.partial(gpu_grouped.grouped, block=(64, 32, 32)))
    gen = torch.Generator().manual_seed(5)
    t, h, i, e, k = 40, 64, 32, 6, 4
    x = torch.randn(t, h, generator=gen)
    gate_up = torch.randn(e + always, 2 * i, h, generator=gen) / h**0.5
    down = torch.randn(e + always, h, i, generator=gen) / i**0.5
    weights = torch.softmax(torch.randn(t, e, generator=gen), -1)
    weights, idx = weights.topk(k, -1)
    if always:
        idx = torch.cat([idx, torch.arange(e, e + always).expand(t, -1)], 1)
        weights = torch.cat([weights, torch.ones(t, always)], 1)

    def expert(rows, n):
        gate, up = (rows @ gate_up[n].double().T).chunk(2, -1)
        return (torch.nn.functional.silu(gate) * up) @ down[n].double().T

    half = [v.half() for v in (x, gate_up, down)]
    ref = ops.run_grouped(expert, e + always, half[0].double(), weights.double(), idx)
    dev = [v.to(DEVICE) for v in half]
    got = ops.run_grouped_mm(dev[0], weights.half().to(DEVICE), idx.to(DEVICE), dev[1], dev[2]).cpu().double()
    assert got.shape == (t, h)
    assert (got - ref).abs().max() <= 2.0**-9 * ref.abs().max()


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
@pytest.mark.parametrize("swiglu", [False, True])
def test_rows_gathered_from_tokens_and_written_back_in_slot_order(dtype, eps, swiglu):
    """order and gather=k: sorted row r reads token order[r] // k while loading; order alone: sorted
    row r is stored at row order[r]. Each row against float64, as above."""
    if DEVICE != "cuda" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's numpy has no bf16: GPU only")
    gen = torch.Generator().manual_seed(9)
    t, k, e, n, kd = 50, 3, 5, 40, 48
    tokens = torch.randn(t, kd, generator=gen).to(dtype)
    w = (torch.randn(e, 2 * n if swiglu else n, kd, generator=gen) / kd**0.5).to(dtype)
    slots = torch.randint(0, e, (t * k,), generator=gen)
    experts, order = torch.sort(slots, stable=True)
    ends = torch.searchsorted(experts, torch.arange(e), right=True).to(torch.int32)
    dev = {"order": order.to(DEVICE), "block": (64, 32, 32)}
    gathered = gpu_grouped.grouped(tokens.to(DEVICE), w.to(DEVICE), ends.to(DEVICE), swiglu=swiglu, gather=k, **dev).cpu()
    scattered = gpu_grouped.grouped(tokens[order // k].to(DEVICE), w.to(DEVICE), ends.to(DEVICE), swiglu=swiglu, **dev).cpu()
    for r, slot in enumerate(order.tolist()):
        x, we = tokens[slot // k].double(), w[slots[slot]].double()
        ref = we @ x
        bound = 1e-5 * (we.abs() @ x.abs())
        if swiglu:
            gate, up = ref[:n], ref[n:]
            ref = torch.nn.functional.silu(gate) * up
            bound = bound[:n] * up.abs() + bound[n:] * gate.abs() + bound[:n] * bound[n:]
        assert ((gathered[r].double() - ref).abs() <= eps * ref.abs() + bound + 1e-6).all(), r
        assert ((scattered[slot].double() - ref).abs() <= eps * ref.abs() + bound + 1e-6).all(), slot
