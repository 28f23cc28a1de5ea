"""Prefill's two expert products as Triton kernels: rows sorted by expert times each expert's weight.

Why: in a 512-token bf16 prefill an expert sees about 48 token rows, so its products are bound by
reading its weights, and torch's grouped GEMM (CUTLASS, sm90) read them at about 2.9 TB/s, 14.2 of
the 22 ms of GPU time (docs/performance.md). Here a program takes BLOCK_N weight rows of
one expert and BLOCK_M of its token rows; an expert's row blocks are neighbours in the grid, so
its weights are read from memory about once however many rows it has. Three pieces of work that
were kernels of their own happen while loading or storing: the gate_up product reads each sorted
row straight from its token, forms silu(gate) * up in registers (a program holds the gate and the
up rows of the same units), and the down product writes each row back to its token's slot.
"""

from __future__ import annotations

import torch

from ernie_cli.kernels.triton import gemv as gpu_gemv
from ernie_cli.kernels.triton import tuned
from ernie_cli.kernels.triton.gemv import tl, triton


def usable(x: torch.Tensor) -> bool:
    """bf16 or fp16 rows on CUDA with Triton, eagerly (or inside a CUDA graph capture)."""
    return gpu_gemv.usable_eagerly(x) and x.dtype in (torch.bfloat16, torch.float16)


if triton is not None:

    def _configs():
        # BLOCK_M 64: the tensor cores' smallest tile on Hopper, and about one expert's rows at 512
        # tokens. Wider BLOCK_N reads more weight rows per program for the same token rows. Every
        # config, with SWIGLU, fits the 227 KiB of shared memory of an sm_90 block (compiled offline).
        return [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((64, 64, 4, 4), (128, 64, 4, 4), (64, 128, 4, 3), (128, 128, 8, 2))
        ]

    @triton.autotune(configs=_configs(), key=["N", "K", "SWIGLU", "ORDER"], **gpu_gemv._keep)
    @triton.jit
    def _grouped(x_ptr, w_ptr, ends_ptr, order_ptr, out_ptr, N, K, E, w_expert_stride, slots,
                 SWIGLU: tl.constexpr, ORDER: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (n, b): weight rows n*BLOCK_N.. of the expert that owns block b, where each expert's
        # rows are cut into blocks of BLOCK_M and the blocks numbered expert after expert. The grid
        # has room for the most blocks there can be; programs past the last block do nothing. The
        # programs of one expert's blocks run side by side, so its weights come from L2 after the
        # first (an expert with many rows, like the shared experts in the stack, is read once).
        b = tl.program_id(1)
        es = tl.arange(0, BLOCK_E)
        ends = tl.load(ends_ptr + es, mask=es < E, other=0)
        starts = tl.load(ends_ptr + es - 1, mask=(es > 0) & (es < E), other=0)
        blocks = tl.where(es < E, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        after = tl.cumsum(blocks, 0)  # blocks up to and including expert e
        e = tl.sum((after <= b).to(tl.int32), 0)
        if e < E:
            mine = es == e
            end = tl.sum(tl.where(mine, ends, 0), 0)
            rows = tl.sum(tl.where(mine, starts + (b - (after - blocks)) * BLOCK_M, 0), 0) + tl.arange(0, BLOCK_M)
            row_ok = rows < end
            cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns; weight rows
            col_ok = cols < N
            ks = tl.arange(0, BLOCK_K)
            w_rows = w_ptr + e.to(tl.int64) * w_expert_stride + cols[:, None].to(tl.int64) * K
            src = rows  # ORDER 1: sorted row r is token order[r] // slots; 2: it goes to row order[r]
            if ORDER == 1:
                src = tl.load(order_ptr + rows, mask=row_ok, other=0) // slots
            x_rows = x_ptr + src[:, None].to(tl.int64) * K
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + ks < K)[None, :]
                a = tl.load(x_rows + k0 + ks[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
                w = tl.load(w_rows + k0 + ks[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
                acc = tl.dot(a, tl.trans(w), acc)
                if SWIGLU:  # the up rows of the same units lie N rows further
                    w = tl.load(w_rows + N * K + k0 + ks[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
                    up = tl.dot(a, tl.trans(w), up)
            if SWIGLU:
                acc = acc * tl.sigmoid(acc) * up
            dst = rows
            if ORDER == 2:
                dst = tl.load(order_ptr + rows, mask=row_ok, other=0)
            out = out_ptr + dst[:, None].to(tl.int64) * N + cols[None, :]
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def grouped(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, swiglu: bool = False,
            order: torch.Tensor | None = None, gather: int = 0, block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Rows sorted by expert times their expert's weight -> [S, N] in x's dtype: x_e @ weight[e].T, or
    silu(x_e @ gate_e.T) * (x_e @ up_e.T) with swiglu, in float32 before one rounding.

    x [S, K] sorted by expert; or, with order [S] and gather=k, the tokens [T, K] themselves, sorted
    row r being token order[r] // k (the k slots of a token sorted by expert: the gather is done
    while loading, not by a kernel of its own). weight [E, N, K] (swiglu: [E, 2N, K], gate rows then
    up rows); ends [E] int32, where expert e's rows end (cumulative). With order and no gather, the
    result's sorted row r is written to row order[r] (back to slot order, while storing).
    block=(BLOCK_M, BLOCK_N, BLOCK_K) skips the tuner (tests under TRITON_INTERPRET)."""
    x, weight = x.contiguous(), weight.contiguous()
    k = x.shape[1]
    s = x.shape[0] if order is None else order.numel()
    e, rows, _ = weight.shape
    n = rows // 2 if swiglu else rows
    out = torch.empty((s, n), dtype=x.dtype, device=x.device)
    kernel, fixed = _grouped, {}
    if block is None and not torch.compiler.is_compiling():  # seeded by the eager runs before any trace
        tuned.seed("_grouped", x.device.index or 0)
    if block is not None:
        kernel = _grouped.fn
        fixed = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), block))
    # Blocks: at most one partial block per expert beyond the whole ones.
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(s, meta["BLOCK_M"]) + e)  # noqa: E731
    kernel[grid](
        x, weight, ends, order if order is not None else ends, out, n, k, e, weight.stride(0), max(gather, 1),
        SWIGLU=swiglu, ORDER=0 if order is None else (1 if gather else 2), BLOCK_E=triton.next_power_of_2(e), **fixed,
    )
    return out
