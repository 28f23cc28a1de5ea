"""Attention over the paged KV cache on CUDA, for a whole batch in one Triton kernel: the decode-only
step (each sequence's new token over its own blocks) and the prompt chunks of a mixed step (each
chunk's tokens over their sequence's blocks, causally).

Why: the batch engine's ragged path runs attention as a loop over the sequences (a gather of each
one's keys and values, then SDPA), five launches and their Python per sequence and layer: at 64
sequences on the 28-layer model about 9,000 launches a step, and a loop whose length changes with
the batch cannot be held by a CUDA graph. Here one program per (sequence, KV head) reads the
sequence's block table, so the step's shapes depend only on the batch size and a graph per
batch-size bucket can hold it.

As kernels/triton/attention.py does for one sequence, the kernel also takes the new token's query,
key and value as the projection left them: it rotates them (RoPE, torch's roundings: the launch
turns off fused multiply-add), writes the key and value into their slot and uses them from
registers, and the GROUP query heads of a KV head are the rows of one tensor-core product.

The prompt chunks of a mixed step ran as a loop over the chunks (gather the sequence's keys and
values, build its mask, SDPA): some ten launches and their Python per chunk and layer, most of a
512-token step's 80 ms on an H200 whose GPU was busy for 19 of them. _paged_prefill takes every
chunk at once: a program holds ROWS_T tokens of one chunk times the GROUP query heads of one KV
head, and reads the blocks of the chunk's sequence up to its last token's position. Its keys and
values are in the pool already (written by the caller, rotated as the chunk's queries are).
"""

from __future__ import annotations

import torch

from ernie_cli.kernels.triton import attention, overlap
from ernie_cli.kernels.triton.gemv import tl, triton
from ernie_cli.model.cache import PagedChunks, PagedDecode

QROWS = attention.QROWS  # query rows of a program, padded up from GROUP for tl.dot
BLOCK_S = 64  # positions per iteration: several blocks of the table at once
PREFILL_ROWS = 64  # rows of a _paged_prefill program: tokens x the GROUP query heads (padded to a power of two)


def usable(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """q [1, B, H, D] and the pool [slots, KV, D] on CUDA with Triton, 16-bit (float32 would go
    through tl.dot's TF32), a head size tl.dot takes, and a group that fits QROWS."""
    heads, kv = q.shape[2], cache_k.shape[1]
    return (
        triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and cache_k.dtype == q.dtype
        and q.shape[0] == 1 and heads % kv == 0 and heads // kv <= QROWS and q.shape[-1] in (64, 128, 256)
        and cache_k.is_contiguous()
    )


if triton is not None:
    from ernie_cli.kernels.triton.overlap import wait_for_inputs  # a module name: gemv.py says why

    @triton.jit
    def _paged_decode(
        q_ptr, k_new_ptr, v_new_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, table_ptr, out_ptr,
        m_ptr, l_ptr, acc_ptr, scale, q_stride, k_stride, v_stride, table_stride,
        HEADS: tl.constexpr, KV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, QROWS: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_inputs(PDL)
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        split = tl.program_id(2)
        pos = tl.load(pos_ptr + b).to(tl.int32)
        chunk = tl.cdiv(tl.cdiv(pos + 1, SPLITS), BLOCK_S) * BLOCK_S
        start = split * chunk
        end = tl.minimum(start + chunk, pos + 1)
        r = tl.arange(0, QROWS)
        d = tl.arange(0, D)
        heads = (kv * GROUP + r)[:, None] * D
        rows = r < GROUP
        q = tl.load(q_ptr + b * q_stride + heads + d[None, :], mask=rows[:, None], other=0.0)
        # RoPE of pairs (2j, 2j+1) at pos, in float32, each result rounded to the activation dtype
        cos = tl.load(cos_ptr + pos * D + d)
        sin = tl.load(sin_ptr + pos * D + d)
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
        q = attention.rotated(q_ptr + b * q_stride, heads + d[None, :], heads + (d ^ 1)[None, :], rows[:, None],
                              cos[None, :], sin[None, :], sign[None, :]).to(q.dtype)
        k_one = attention.rotated(k_new_ptr + b * k_stride, kv * D + d, kv * D + (d ^ 1), d < D, cos, sin, sign)
        k_one = k_one.to(k_ptr.dtype.element_ty)
        v_one = tl.load(v_new_ptr + b * v_stride + kv * D + d).to(k_ptr.dtype.element_ty)
        if (start <= pos) & (pos < end):  # the one program whose stretch holds pos writes the new slot
            slot = tl.load(slot_ptr + b).to(tl.int64)
            tl.store(k_ptr + (slot * KV + kv) * D + d, k_one)
            tl.store(v_ptr + (slot * KV + kv) * D + d, v_one)
        m = tl.full((QROWS,), float("-inf"), tl.float32)
        l = tl.zeros((QROWS,), tl.float32)
        acc = tl.zeros((QROWS, D), tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < end
            page = tl.load(table_ptr + b * table_stride + s // PAGE, mask=ok, other=0).to(tl.int64)
            at = ((page * PAGE + s % PAGE) * KV + kv)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + at, mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + at, mask=ok[:, None], other=0.0)
            new = (s == pos)[:, None]  # the new key and value from registers, not from the store above
            k = tl.where(new, k_one[None, :], k)
            v = tl.where(new, v_one[None, :], v)
            m, l, acc = attention.attend(q, k, v, ok[None, :], scale, m, l, acc)
        if SPLITS == 1:
            out = acc / l[:, None]
            tl.store(out_ptr + b * HEADS * D + heads + d[None, :], out.to(out_ptr.dtype.element_ty), mask=rows[:, None])
        else:  # attention.py's _combine weighs the stretches: (sequence, KV head) stands where its KV head does
            part = ((b * KV + kv) * SPLITS + split) * QROWS + r
            tl.store(m_ptr + part, m)
            tl.store(l_ptr + part, l)
            tl.store(acc_ptr + part[:, None] * D + d[None, :], acc)

    @triton.jit
    def _paged_prefill(
        q_ptr, k_ptr, v_ptr, out_ptr, meta_ptr, table_ptr, prog_ptr, scale, table_stride,
        HEADS: tl.constexpr, KV: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr,
        ROWS_T: tl.constexpr, PAGE: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_inputs(PDL)
        # Program (p, kv): tokens i0 .. i0 + ROWS_T - 1 of chunk c (prog_ptr holds c and i0 of each p);
        # its rows are (token, query head of KV head kv) pairs, the group padded to GROUP_P.
        p = tl.program_id(0)
        kv = tl.program_id(1)
        c = tl.load(prog_ptr + 2 * p)
        i0 = tl.load(prog_ptr + 2 * p + 1)
        first = tl.load(meta_ptr + 4 * c).to(tl.int64)  # the chunk's first row in q
        t = tl.load(meta_ptr + 4 * c + 1)
        start = tl.load(meta_ptr + 4 * c + 2)
        r = tl.arange(0, ROWS_T * GROUP_P)
        i = i0 + r // GROUP_P
        g = r % GROUP_P
        rows = (i < t) & (g < GROUP)
        pos = start + tl.minimum(i, t - 1)  # a padding row attends as the chunk's last token: never an empty row
        d = tl.arange(0, D)
        at_q = (first + i).to(tl.int64)[:, None] * (HEADS * D) + (kv * GROUP + g)[:, None] * D + d[None, :]
        q = tl.load(q_ptr + at_q, mask=rows[:, None], other=0.0)
        hi = start + tl.minimum(i0 + ROWS_T, t)  # keys past the program's last token are never seen
        m = tl.full((ROWS_T * GROUP_P,), float("-inf"), tl.float32)
        l = tl.zeros((ROWS_T * GROUP_P,), tl.float32)
        acc = tl.zeros((ROWS_T * GROUP_P, D), tl.float32)
        for s0 in range(0, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < hi
            page = tl.load(table_ptr + c.to(tl.int64) * table_stride + s // PAGE, mask=ok, other=0).to(tl.int64)
            at = ((page * PAGE + s % PAGE) * KV + kv)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + at, mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + at, mask=ok[:, None], other=0.0)
            # Key 0 is in the first stretch and seen by every row, so m is finite from then on.
            m, l, acc = attention.attend(q, k, v, ok[None, :] & (s[None, :] <= pos[:, None]), scale, m, l, acc)
        out = acc / l[:, None]
        tl.store(out_ptr + at_q, out.to(out_ptr.dtype.element_ty), mask=rows[:, None])


def splits_for(b: int, kv: int) -> int:
    """Stretches per (sequence, KV head): enough programs to fill the GPU's multiprocessors (132 on
    an H200) when the batch is small; one, and no second kernel, once the batch alone does."""
    fill = max(1, min(16, 128 // (b * kv)))
    return 1 << (fill.bit_length() - 1)  # a power of two: the combining kernel's arange


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, batch: PagedDecode, scale: float) -> torch.Tensor:
    """q [1, B, H, D], k and v [1, B, KV, D] as projected (views into the fused q/k/v product are
    fine: rows are read at their own strides); cos/sin the whole RoPE tables [N, D]; the pool
    cache_k/cache_v [slots, KV, D]. Writes each new key and value at its slot -> [1, B, H * D]."""
    _, b, heads, dim = q.shape
    kv = k.shape[2]
    for t in (q, k, v):
        assert t.stride(3) == 1 and t.stride(2) == dim  # heads packed within a token, as the projection leaves them
    out = torch.empty((1, b, heads * dim), device=q.device, dtype=q.dtype)
    splits = splits_for(b, kv)
    if splits > 1:
        m = torch.empty((b * kv, splits, QROWS), device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        acc = torch.empty((b * kv, splits, QROWS, dim), device=q.device, dtype=torch.float32)
    else:
        m = l = acc = out  # not written
    _paged_decode[(b, kv, splits)](
        q, k, v, cache_k, cache_v, cos, sin, batch.positions, batch.slots, batch.table, out, m, l, acc,
        scale, q.stride(1), k.stride(1), v.stride(1), batch.table.stride(0),
        HEADS=heads, KV=kv, GROUP=heads // kv, D=dim, QROWS=QROWS, PAGE=batch.block, BLOCK_S=BLOCK_S, SPLITS=splits,
        enable_fp_fusion=False, **overlap.launch_args(q),
    )
    if splits > 1:
        attention._combine[(b * heads,)](
            m, l, acc, out, GROUP=heads // kv, D=dim, SPLITS=splits, QROWS=QROWS, **overlap.launch_args(q))
    return out


def prefill(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, chunks: PagedChunks, scale: float) -> torch.Tensor:
    """The prompt chunks' queries q [N, H, D] (rotated, contiguous, the chunks one after another),
    their keys and values already in the pool cache_k/cache_v [slots, KV, D] -> [N, H * D]: each
    token attends over its sequence's positions up to its own."""
    n, heads, dim = q.shape
    kv = cache_k.shape[1]
    assert q.is_contiguous() and cache_k.is_contiguous() and cache_v.is_contiguous()
    out = torch.empty((n, heads * dim), device=q.device, dtype=q.dtype)
    group = heads // kv
    group_p = triton.next_power_of_2(group)
    rows_t = PREFILL_ROWS // group_p
    programs = chunks.programs(rows_t)
    _paged_prefill[(programs.shape[0], kv)](
        q, cache_k, cache_v, out, chunks.meta, chunks.table, programs, scale, chunks.table.stride(0),
        HEADS=heads, KV=kv, GROUP=group, GROUP_P=group_p, D=dim, ROWS_T=rows_t, PAGE=chunks.block,
        BLOCK_S=BLOCK_S, num_warps=4, **overlap.launch_args(q),
    )
    return out
