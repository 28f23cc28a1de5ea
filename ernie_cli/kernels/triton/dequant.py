"""int8/int4 weights (the disk layouts of ernie_cli.quant.formats) expanded to bf16/fp16/fp32 by one
Triton kernel, into a scratch buffer reused from call to call, for products of many tokens on CUDA.

Why: a prefill product is compute-bound, so the tensor cores should see floats (F.linear, grouped
GEMMs), and the expansion should cost one pass over the bytes. formats.dequantize in torch ops is
about ten passes with float32 temporaries, and the routed experts of a layer went one expert at a
time with a host sync, so int8 prefill ran at an eighth of bf16's speed.

The values are those of formats.dequantize to the bit: float32 arithmetic, (q - 8)·s + z for int4
with the product and the sum rounded separately (fused multiply-add is turned off), one rounding to
the output dtype.
"""

from __future__ import annotations

import torch

from ernie_cli.kernels.triton import gemv as gpu_gemv
from ernie_cli.kernels.triton.gemv import tl, triton

_scratch: dict[tuple, torch.Tensor] = {}


usable = gpu_gemv.usable_eagerly


if triton is not None:

    @triton.jit
    def _dequantize(q_ptr, s_ptr, z_ptr, out_ptr, R, K, groups, FMT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = (rows < R)[:, None]
        kind = out_ptr.dtype.element_ty
        if FMT == 1:
            cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            ok = row_ok & (cols < K)[None, :]
            q = tl.load(q_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0).to(tl.float32)
            s = tl.load(s_ptr + rows, mask=rows < R, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * K + cols[None, :], (q * s[:, None]).to(kind), mask=ok)
        else:  # a row's bytes hold columns 2j (low nibble) and 2j+1; BLOCK_K is a multiple of GROUP
            NG: tl.constexpr = BLOCK_K // GROUP
            half = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            ok = row_ok & (half < K // 2)[None, :]
            packed = tl.load(q_ptr + rows[:, None] * (K // 2) + half[None, :], mask=ok, other=0).to(tl.int32)
            g = tl.program_id(1) * NG + tl.arange(0, NG)
            g_ok = row_ok & (g < groups)[None, :]
            s = tl.load(s_ptr + rows[:, None] * groups + g[None, :], mask=g_ok, other=0.0).to(tl.float32)[:, :, None]
            z = tl.load(z_ptr + rows[:, None] * groups + g[None, :], mask=g_ok, other=0.0).to(tl.float32)[:, :, None]
            lo = tl.reshape((packed & 0xF).to(tl.float32) - 8.0, (BLOCK_R, NG, GROUP // 2)) * s + z
            hi = tl.reshape((packed >> 4).to(tl.float32) - 8.0, (BLOCK_R, NG, GROUP // 2)) * s + z
            w = tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_K))  # interleaved back: 2j, 2j+1
            cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            tl.store(out_ptr + rows[:, None] * K + cols[None, :], w.to(kind), mask=row_ok & (cols < K)[None, :])


def dequantize(fmt: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               in_features: int, dtype: torch.dtype, slot: str = "") -> torch.Tensor:
    """The float weight [..., out, in] of a disk-layout int8/int4 weight (or stack), in a scratch
    buffer owned by (slot, shape, dtype): valid until the next call for the same slot and shape.
    Reuse is safe within one CUDA stream, which orders the writes after earlier reads."""
    shape = (*qweight.shape[:-1], in_features)
    key = (slot, shape, dtype, qweight.device)
    out = _scratch.get(key)
    if out is None:
        out = _scratch[key] = torch.empty(shape, dtype=dtype, device=qweight.device)
    rows = out.numel() // in_features
    groups = scales.shape[-1] if fmt == "int4" else 0
    block_r, block_k = 16, 256
    _dequantize[(triton.cdiv(rows, block_r), triton.cdiv(in_features, block_k))](
        qweight.contiguous(), scales.contiguous(), zeros.contiguous() if zeros is not None else scales, out,
        rows, in_features, groups, FMT=1 if fmt == "int8" else 2, GROUP=group_size or 1,
        BLOCK_R=block_r, BLOCK_K=block_k, enable_fp_fusion=False,
    )
    return out
