"""RMSNorm (alone, or after the residual addition before it), the interleaved RoPE, the weighted
sum of a token's expert outputs and the greedy read-back of a batch's logits as one Triton kernel
each, for eager steps on CUDA (prefill, and the decode steps captured from the eager code).

Why: written in torch, RMSNorm is eight kernels and RoPE eight per tensor, about 32 of the ~80
launches of a layer's eager forward. A 512-token prefill of the full model is then bound by
Python queueing kernels, not by the GPU. The weighted sum was four kernels of a few microseconds in
every MoE layer of a decode step (two casts, the product, the cast back). The residual addition
before each norm was a kernel of its own, 56 a step of the 28-layer model. In a compiled step
Inductor fuses them itself, so these kernels are for eager code only.

Same arithmetic as model.RMSNorm and model.apply_rope: float32 math, rounded to the activation dtype
where torch rounds. RoPE keeps torch's three roundings (two products, one sum): the launch turns
off fused multiply-add, which would round once.
"""

from __future__ import annotations

import torch

from ernie_cli.kernels.triton import gemv as gpu_gemv
from ernie_cli.kernels.triton import overlap
from ernie_cli.kernels.triton.gemv import tl, triton

usable = gpu_gemv.usable_eagerly


if triton is not None:
    from ernie_cli.kernels.triton.overlap import wait_for_inputs  # a module name: gemv.py says why

    @triton.jit
    def _store_norm(x, w_ptr, out_ptr, row, cols, ok, H, eps):
        # x: the row in the activation dtype; the weight is applied after the cast back, as in torch
        h = x.to(tl.float32)
        h = h * tl.math.rsqrt(tl.sum(h * h, 0) / H + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        y = h.to(x.dtype).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * H + cols, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _store_sum_and_norm(x_ptr, delta, w_ptr, sum_ptr, out_ptr, row, cols, ok, H, eps):
        x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0)
        total = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)  # torch's addition: one rounding
        tl.store(sum_ptr + row * H + cols, total, mask=ok)
        _store_norm(total, w_ptr, out_ptr, row, cols, ok, H, eps)

    @triton.jit
    def _mixture(y_ptr, p_ptr, cols, ok, H, P: tl.constexpr):
        # The P expert outputs y [P, H] at these columns weighed by p [P], summed in float32 slot by slot.
        acc = tl.zeros(cols.shape, tl.float32)
        for slot in tl.static_range(P):
            y = tl.load(y_ptr + slot * H + cols, mask=ok, other=0.0).to(tl.float32)
            acc += y * tl.load(p_ptr + slot).to(tl.float32)
        return acc

    @triton.jit
    def _rms_norm(x_ptr, w_ptr, out_ptr, H, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        _store_norm(tl.load(x_ptr + row * H + cols, mask=ok, other=0.0), w_ptr, out_ptr, row, cols, ok, H, eps)

    @triton.jit
    def _add_rms_norm(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, H, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        delta = tl.load(d_ptr + row * H + cols, mask=ok, other=0.0)
        _store_sum_and_norm(x_ptr, delta, w_ptr, sum_ptr, out_ptr, row, cols, ok, H, eps)

    @triton.jit
    def _add_mixture_rms_norm(x_ptr, y_ptr, p_ptr, w_ptr, sum_ptr, out_ptr, H, eps, P: tl.constexpr,
                              BLOCK: tl.constexpr, PDL: tl.constexpr):
        # One token: delta is its expert mixture rounded to the activation dtype, as _weighted_sum gives it.
        wait_for_inputs(PDL)
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        delta = _mixture(y_ptr, p_ptr, cols, ok, H, P).to(x_ptr.dtype.element_ty)
        _store_sum_and_norm(x_ptr, delta, w_ptr, sum_ptr, out_ptr, 0, cols, ok, H, eps)

    @triton.jit
    def _argmax_finite(x_ptr, out_ptr, V, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # One program per row: its first largest entry, and whether every entry is finite.
        wait_for_inputs(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        best = tl.full((BLOCK,), float("-inf"), tl.float32)
        where = tl.zeros((BLOCK,), tl.int32)
        bad = tl.zeros((BLOCK,), tl.int32)
        for c0 in range(0, V, BLOCK):
            c = c0 + cols
            ok = c < V
            x = tl.load(x_ptr + row * V + c, mask=ok, other=float("-inf")).to(tl.float32)
            bad = bad | (ok & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32)
            take = x > best  # strictly: a lane keeps its earlier index on a tie
            best = tl.where(take, x, best)
            where = tl.where(take, c, where)
        top = tl.max(best, 0)
        first = tl.min(tl.where(best == top, where, V), 0)
        tl.store(out_ptr + 2 * row, (tl.max(bad, 0) == 0).to(tl.int64))
        tl.store(out_ptr + 2 * row + 1, first.to(tl.int64))

    @triton.jit
    def _rope(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, x_token_stride, x_head_stride, D: tl.constexpr, BLOCK_H: tl.constexpr,
              PDL: tl.constexpr):
        wait_for_inputs(PDL)
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j = tl.arange(0, D // 2)
        ok = (h < heads)[:, None]
        src = x_ptr + t * x_token_stride + h[:, None] * x_head_stride + 2 * j[None, :]
        even = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        odd = tl.load(src + 1, mask=ok, other=0.0).to(tl.float32)
        c_even = tl.load(cos_ptr + t * D + 2 * j)[None, :]
        c_odd = tl.load(cos_ptr + t * D + 2 * j + 1)[None, :]
        s_even = tl.load(sin_ptr + t * D + 2 * j)[None, :]
        s_odd = tl.load(sin_ptr + t * D + 2 * j + 1)[None, :]
        dst = out_ptr + (t * heads + h[:, None]) * D + 2 * j[None, :]
        kind = out_ptr.dtype.element_ty
        tl.store(dst, (even * c_even + (-odd) * s_even).to(kind), mask=ok)
        tl.store(dst + 1, (odd * c_odd + even * s_odd).to(kind), mask=ok)


    @triton.jit
    def _weighted_sum(y_ptr, w_ptr, out_ptr, H, P: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_inputs(PDL)
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < H
        tl.store(out_ptr + cols, _mixture(y_ptr, w_ptr, cols, ok, H, P).to(out_ptr.dtype.element_ty), mask=ok)


def weighted_sum(y: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One token's expert outputs y [P, H] weighed by w [P] and summed in float32 -> [1, H] in dtype."""
    p, h = y.shape
    y, w = y.contiguous(), w.contiguous()
    out = torch.empty((1, h), dtype=dtype, device=y.device)
    block = 512  # 5 programs for H = 2,560: the sum is a few microseconds at most, its launch the cost
    _weighted_sum[(triton.cdiv(h, block),)](y, w, out, h, P=p, BLOCK=block, **overlap.launch_args(y))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm's forward: x [..., H] -> [..., H] in the dtype torch would give (weight · x)."""
    h = x.shape[-1]
    rows = x.reshape(-1, h).contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _rms_norm[(rows.shape[0],)](rows, weight, out, h, eps, BLOCK=triton.next_power_of_2(h), **overlap.launch_args(x))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) of two [..., H] tensors of one dtype, the sum rounded as torch's."""
    h = x.shape[-1]
    rows, deltas = x.reshape(-1, h).contiguous(), delta.reshape(-1, h).contiguous()
    total = torch.empty_like(rows)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _add_rms_norm[(rows.shape[0],)](
        rows, deltas, weight, total, out, h, eps, BLOCK=triton.next_power_of_2(h), **overlap.launch_args(x))
    return total.view(x.shape), out.view(x.shape)


def add_mixture_rms_norm(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm of one token x [.., H] and delta = sum_k p_k y_k of its expert outputs y [k, H]
    (router weights p [k]), in one kernel: a MoE layer's weighted sum needs no kernel of its own."""
    h = x.shape[-1]
    rows, y, p = x.reshape(-1, h).contiguous(), y.contiguous(), p.contiguous()
    assert rows.shape[0] == 1 and y.shape[-1] == h
    total = torch.empty_like(rows)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _add_mixture_rms_norm[(1,)](rows, y, p, weight, total, out, h, eps, P=y.shape[0], BLOCK=triton.next_power_of_2(h),
                                num_warps=8, **overlap.launch_args(x))
    return total.view(x.shape), out.view(x.shape)


def argmax_finite(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> int64 [2, B]: whether each row is all finite, and its first largest entry's
    index (torch.argmax's choice on a tie). One kernel where torch took six (about 40 µs a step on
    an H200 at V = 103,424, against a decode step of 2.7 ms)."""
    b, v = logits.shape
    logits = logits.contiguous()
    out = torch.empty((b, 2), dtype=torch.int64, device=logits.device)  # B is no argument: no kernel per batch size
    _argmax_finite[(b,)](logits, out, v, BLOCK=2048, num_warps=8, **overlap.launch_args(logits))
    return out.t()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rope on x [T, heads, D] (any token and head strides, unit stride inside a head),
    for batch 1 -> a new contiguous [T, heads, D]; cos/sin float32 [T, D], interleaved."""
    t, heads, d = x.shape
    assert x.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous()
    out = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(heads), 16)
    _rope[(t, triton.cdiv(heads, block_h))](
        x, cos, sin, out, heads, x.stride(0), x.stride(1), D=d, BLOCK_H=block_h, enable_fp_fusion=False,
        **overlap.launch_args(x),
    )
    return out
