"""Attention of one new token over the KV cache on CUDA, in two Triton kernels (split-K "flash
decoding"), for the compiled decode step.

Why not SDPA: the decode graph must keep static shapes, so it called SDPA over the cache's whole
capacity with a mask; that cost about 10 µs a layer on the H200 (cuDNN, two kernels, plus the
mask's own kernel), 8% of a bf16 step (docs/performance.md). Here the filled length is read from the
position tensor on the GPU, so only filled slots are read, and the grid stays fixed: SPLITS
programs per KV head each take one stretch of the positions, with the GROUP query heads that share
that KV head as the rows of one tensor-core product; a second kernel weighs the stretches' partial
sums by their softmax maxima.
"""

from __future__ import annotations

import os

import torch

from ernie_cli import gpu_gemv
from ernie_cli.gpu_gemv import tl, triton

SPLITS = 16  # stretches per KV head: 4 KV heads x 16 = 64 programs, and 8,192 cached tokens give each 512
QROWS = 16  # query rows of a program, padded up from GROUP for tl.dot
# The Triton interpreter multiplies bf16 tensors by their bit patterns in tl.dot; there the kernel
# multiplies in float32 instead, so the tests under the interpreter check the rest of it.
_DOT_IN_FLOAT32 = os.environ.get("TRITON_INTERPRET", "0") == "1"
ENABLED = os.environ.get("ERNIE_DECODE_ATTENTION", "triton") != "sdpa"  # sdpa: the masked SDPA, for comparison


def usable(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """One token, batch 1, on CUDA with Triton, 16-bit activations (float32 would go through tl.dot's
    TF32), a head size tl.dot takes, and a group that fits QROWS."""
    heads, kv = q.shape[1], cache_k.shape[1]
    return (
        triton is not None and q.is_cuda and gpu_gemv.ENABLED and ENABLED and q.dtype in (torch.bfloat16, torch.float16)
        and cache_k.dtype == q.dtype and q.shape[0] == 1 and q.shape[2] == 1
        and cache_k.shape[0] == 1 and heads % kv == 0 and heads // kv <= QROWS and q.shape[-1] in (64, 128, 256)
    )


if triton is not None:

    @triton.jit
    def _partial(
        q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, scale, kv_stride,
        GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, QROWS: tl.constexpr, BLOCK_S: tl.constexpr,
        F32: tl.constexpr,
    ):
        kv = tl.program_id(0)
        split = tl.program_id(1)
        length = tl.load(pos_ptr).to(tl.int32) + 1  # the new token's own key is already in the cache
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_S) * BLOCK_S
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        r = tl.arange(0, QROWS)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (kv * GROUP + r)[:, None] * D + d[None, :], mask=(r < GROUP)[:, None], other=0.0)
        if F32:
            q = q.to(tl.float32)
        m = tl.full((QROWS,), float("-inf"), tl.float32)
        l = tl.zeros((QROWS,), tl.float32)
        acc = tl.zeros((QROWS, D), tl.float32)
        base = kv.to(tl.int64) * kv_stride
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < end
            k = tl.load(k_ptr + base + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + base + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            if F32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = (kv * SPLITS + split) * QROWS + r
        tl.store(m_ptr + out, m)
        tl.store(l_ptr + out, l)
        tl.store(acc_ptr + out[:, None] * D + d[None, :], acc)

    @triton.jit
    def _combine(m_ptr, l_ptr, acc_ptr, out_ptr, GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, QROWS: tl.constexpr):
        head = tl.program_id(0)
        kv = head // GROUP
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        rows = (kv * SPLITS + sp) * QROWS + head % GROUP
        m = tl.load(m_ptr + rows)
        top = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # empty stretches weigh nothing
        total = tl.sum(w * tl.load(l_ptr + rows), 0)
        acc = tl.sum(w[:, None] * tl.load(acc_ptr + rows[:, None] * D + d[None, :]), 0)
        tl.store(out_ptr + head * D + d, (acc / total).to(out_ptr.dtype.element_ty))


def decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor, scale: float,
           block_s: int = 64) -> torch.Tensor:
    """q [1, H, 1, D] of the token at position pos (a one-element device tensor) against the cache
    [1, KV, capacity, D], whose slots 0..pos are filled -> [1, H, 1, D] in q's dtype."""
    return decode_op(q, cache_k, cache_v, pos, scale, block_s)


# An operator, opaque to Dynamo: traced as plain Triton calls, the 8-layer decode graph failed to
# compile on the device (round 40), while the kernels passed their tests eagerly. Inside the CUDA
# graph the operator costs nothing more: the graph replays its two launches.
@torch.library.custom_op("ernie::decode_attention", mutates_args=())
def decode_op(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor, scale: float,
              block_s: int) -> torch.Tensor:
    _, heads, _, dim = q.shape
    kv = cache_k.shape[1]
    group = heads // kv
    q2 = q.reshape(heads, dim).contiguous()
    m = torch.empty((kv, SPLITS, QROWS), device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty((kv, SPLITS, QROWS, dim), device=q.device, dtype=torch.float32)
    _partial[(kv, SPLITS)](
        q2, cache_k, cache_v, pos, m, l, acc, scale, cache_k.stride(1),
        GROUP=group, D=dim, SPLITS=SPLITS, QROWS=QROWS, BLOCK_S=block_s, F32=_DOT_IN_FLOAT32,
    )
    out = torch.empty((1, heads, 1, dim), device=q.device, dtype=q.dtype)
    _combine[(heads,)](m, l, acc, out, GROUP=group, D=dim, SPLITS=SPLITS, QROWS=QROWS)
    return out


@decode_op.register_fake
def _(q, cache_k, cache_v, pos, scale, block_s):
    return q.new_empty(q.shape)
