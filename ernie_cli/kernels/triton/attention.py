"""Attention of one new token over the KV cache on CUDA, in two Triton kernels (split-K "flash
decoding"), for the compiled decode step.

Why not SDPA: the decode graph must keep static shapes, so it called SDPA over the cache's whole
capacity with a mask; that cost about 10 µs a layer on the H200 (cuDNN, two kernels, plus the
mask's own kernel), 8% of a bf16 step (docs/performance.md). Here the filled length is read from the
position tensor on the GPU, so only filled slots are read, and the grid stays fixed: SPLITS
programs per KV head each take one stretch of the positions, with the GROUP query heads that share
that KV head as the rows of one tensor-core product; a second kernel weighs the stretches' partial
sums by their softmax maxima. (Having the last of a KV head's programs to finish do that weighing, told
by an atomic counter, saved the launch but measured 3.7% slower a bf16 step; removed.)

The first kernel can also take the new token's query, key and value as the projection left them:
it rotates them (RoPE) and writes the key and value into the cache itself
(`rotate_write_decode`). This removes the graph's RoPE and cache-write kernels of every layer.
"""

from __future__ import annotations

import torch

from ernie_cli.kernels.triton import overlap
from ernie_cli.kernels.triton.gemv import tl, triton

SPLITS = 16  # stretches per KV head: 4 KV heads x 16 = 64 programs, and 8,192 cached tokens give each 512
QROWS = 16  # query rows of a program, padded up from GROUP for tl.dot
# The Triton interpreter multiplies bf16 tensors by their bit patterns in tl.dot; there the kernel
# multiplies in float32 instead, so the tests under the interpreter check the rest of it.
_DOT_IN_FLOAT32 = overlap.INTERPRETED


def usable(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """One token, batch 1, on CUDA with Triton, 16-bit activations (float32 would go through tl.dot's
    TF32), a head size tl.dot takes, and a group that fits QROWS."""
    heads, kv = q.shape[1], cache_k.shape[1]
    return (
        triton is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
        and cache_k.dtype == q.dtype and q.shape[0] == 1 and q.shape[2] == 1
        and cache_k.shape[0] == 1 and heads % kv == 0 and heads // kv <= QROWS and q.shape[-1] in (64, 128, 256)
    )


if triton is not None:
    from ernie_cli.kernels.triton.overlap import wait_for_inputs  # a module name: gemv.py says why

    @triton.jit
    def rotated(ptr, at, at_mate, mask, cos, sin, sign):
        """model.apply_rope in float32 of the entries at `at`, each paired with the one at `at_mate`
        (2j with 2j+1); sign is -1 for even entries. The launch turns off fused multiply-add, so the
        roundings are torch's (the caller rounds the result to the activation dtype)."""
        x = tl.load(ptr + at, mask=mask, other=0.0).to(tl.float32)
        mate = tl.load(ptr + at_mate, mask=mask, other=0.0).to(tl.float32)
        return x * cos + (sign * mate) * sin

    @triton.jit
    def attend(q, k, v, visible, scale, m, l, acc):
        """Online softmax over one stretch of keys k and values v for the query rows q: the running
        max m, sum l and weighted sum acc after it (visible: the scores that count)."""
        scores = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    @triton.jit
    def _partial(
        q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, scale, kv_stride,
        k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, trig_stride,
        GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, QROWS: tl.constexpr, BLOCK_S: tl.constexpr,
        F32: tl.constexpr, ROPE_WRITE: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_inputs(PDL)
        kv = tl.program_id(0)
        split = tl.program_id(1)
        pos = tl.load(pos_ptr).to(tl.int32)
        length = pos + 1  # the new token's own key is in the cache (ROPE_WRITE: put there by this kernel)
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_S) * BLOCK_S
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        r = tl.arange(0, QROWS)
        d = tl.arange(0, D)
        rows = (kv * GROUP + r)[:, None] * D
        q = tl.load(q_ptr + rows + d[None, :], mask=(r < GROUP)[:, None], other=0.0)
        base = kv.to(tl.int64) * kv_stride
        if ROPE_WRITE:
            # model.apply_rope in float32, pairs (2j, 2j+1) rotated by the angles at pos; the launch
            # turns off fused multiply-add, so the roundings are torch's. The split whose stretch
            # holds pos is the only program of this KV head that reads that slot: it writes the new
            # key and value there and uses them from registers, not from memory it has just written.
            cos = tl.load(cos_ptr + pos * trig_stride + d)  # trig_stride 0: the row itself was given
            sin = tl.load(sin_ptr + pos * trig_stride + d)
            sign = tl.where(d % 2 == 0, -1.0, 1.0)
            q = rotated(q_ptr, rows + d[None, :], rows + (d ^ 1)[None, :], (r < GROUP)[:, None],
                        cos[None, :], sin[None, :], sign[None, :]).to(q.dtype)
            k_one = rotated(k_new_ptr, kv * D + d, kv * D + (d ^ 1), d < D, cos, sin, sign).to(k_ptr.dtype.element_ty)
            v_one = tl.load(v_new_ptr + kv * D + d).to(k_ptr.dtype.element_ty)
            if (start <= pos) & (pos < end):
                tl.store(k_ptr + base + pos * D + d, k_one)
                tl.store(v_ptr + base + pos * D + d, v_one)
        if F32:
            q = q.to(tl.float32)
        m = tl.full((QROWS,), float("-inf"), tl.float32)
        l = tl.zeros((QROWS,), tl.float32)
        acc = tl.zeros((QROWS, D), tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < end
            k = tl.load(k_ptr + base + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + base + s[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            if ROPE_WRITE:
                new = (s == pos)[:, None]
                k = tl.where(new, k_one[None, :], k)
                v = tl.where(new, v_one[None, :], v)
            if F32:
                k, v = k.to(tl.float32), v.to(tl.float32)
            m, l, acc = attend(q, k, v, ok[None, :], scale, m, l, acc)
        out = (kv * SPLITS + split) * QROWS + r
        tl.store(m_ptr + out, m)
        tl.store(l_ptr + out, l)
        tl.store(acc_ptr + out[:, None] * D + d[None, :], acc)

    @triton.jit
    def _combine(m_ptr, l_ptr, acc_ptr, out_ptr, GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, QROWS: tl.constexpr,
                 PDL: tl.constexpr):
        wait_for_inputs(PDL)
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
    op = decode_op if torch.compiler.is_compiling() else _decode
    return op(q, cache_k, cache_v, pos, scale, block_s)


def _decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor, scale: float,
            block_s: int) -> torch.Tensor:
    return _attend(q.reshape(q.shape[1], q.shape[-1]).contiguous(), cache_k, cache_v, pos, scale, block_s)


def rotate_write_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, scale: float, block_s: int = 64) -> torch.Tensor:
    """The new token as the projection left it: q [1, 1, H, D], k and v [1, 1, KV, D], not yet
    rotated. RoPE with cos/sin (float32, interleaved): the whole tables [N, D], whose row pos the
    kernel reads, or that row alone [1, D]. The rotated key and the value are written into the
    caches at pos, then decode's attention -> [1, H, 1, D]."""
    op = rotate_write_decode_op if torch.compiler.is_compiling() else _rotate_write_decode
    return op(q, k, v, cache_k, cache_v, cos, sin, pos, scale, block_s)


def _rotate_write_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, scale: float, block_s: int) -> torch.Tensor:
    heads, kv, dim = q.shape[2], k.shape[2], q.shape[-1]
    assert cache_k.is_contiguous() and cache_v.is_contiguous()  # the kernel writes slot pos at pos * D
    rows = (q.reshape(heads, dim), k.reshape(kv, dim), v.reshape(kv, dim))
    q2, k2, v2 = (t.contiguous() for t in rows)  # no copy where already contiguous
    cos2, sin2 = (t.reshape(-1, dim).contiguous() for t in (cos, sin))
    return _attend(q2, cache_k, cache_v, pos, scale, block_s, (k2, v2, cos2, sin2, dim if cos2.shape[0] > 1 else 0))


# For torch.compile, each is an operator, opaque to Dynamo: traced as plain Triton calls, the 8-layer
# decode graph failed to compile on the GPU (Dynamo typed the float scale as fp64), while the kernels
# passed their tests eagerly. Inside the CUDA graph the operator costs nothing more: the graph replays
# its launches. Eagerly (and in the step captured from the eager code) the functions are called
# directly: the first call of any custom operator imports Dynamo, sympy and FSDP, 2.2 s on a CPU with
# its bytecode cached and about 3.5 s on the device, all inside the first decode step.
decode_op = torch.library.custom_op("ernie::decode_attention", _decode, mutates_args=())


@decode_op.register_fake
def _(q, cache_k, cache_v, pos, scale, block_s):
    return q.new_empty(q.shape)


# The caches are mutated inside the operator (declared, so torch.compile orders it and writes in
# place: tests/test_gpu_attention_writes.py checks the compiled code for copies of the cache).
rotate_write_decode_op = torch.library.custom_op(
    "ernie::rotate_write_decode_attention", _rotate_write_decode, mutates_args=("cache_k", "cache_v"))


@rotate_write_decode_op.register_fake
def _(q, k, v, cache_k, cache_v, cos, sin, pos, scale, block_s):
    return q.new_empty((1, q.shape[2], 1, q.shape[-1]))


def _attend(q2, cache_k, cache_v, pos, scale, block_s, new=None):
    """q2 [H, D] -> [1, H, 1, D]; new: (k [KV, D], v [KV, D], cos, sin, the stride of their rows: 0 for
    the row at pos alone) to rotate and write first."""
    heads, dim = q2.shape
    kv = cache_k.shape[1]
    m = torch.empty((kv, SPLITS, QROWS), device=q2.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty((kv, SPLITS, QROWS, dim), device=q2.device, dtype=torch.float32)
    extra = new if new is not None else (q2, q2, m, m, 0)  # not read without ROPE_WRITE
    out = torch.empty((1, heads, 1, dim), device=q2.device, dtype=q2.dtype)
    _partial[(kv, SPLITS)](
        q2, cache_k, cache_v, pos, m, l, acc, scale, cache_k.stride(1), *extra,
        GROUP=heads // kv, D=dim, SPLITS=SPLITS, QROWS=QROWS, BLOCK_S=block_s, F32=_DOT_IN_FLOAT32,
        ROPE_WRITE=new is not None, enable_fp_fusion=new is None, **overlap.launch_args(q2),
    )
    _combine[(heads,)](m, l, acc, out, GROUP=heads // kv, D=dim, SPLITS=SPLITS, QROWS=QROWS, **overlap.launch_args(q2))
    return out
