"""One-token matrix-vector products on CUDA as Triton kernels: float, int8 and int4 weights, one
matrix or the k experts a token selected, in one launch.

Why not Inductor's fused dequantize-multiply-sum: on the H100 it read int8 experts at 726 GB/s, a
quarter of the card's bandwidth, and int4 at 190 GB/s. A GEMV is nothing but a stream of weight
rows against one vector, so the kernel is short: each program takes BLOCK_N rows of one expert,
walks K in BLOCK_K steps, turns the bytes into float32 in registers, and reduces.

Weights are the disk layouts of ernie_cli.quant.formats (int8 [.., N, K] with one scale per row;
int4 [.., N, K/2] with column 2j in the low nibble and a scale and zero per group: W = (q-8)s + z),
so nothing is repacked. int4 uses sum_k W_k x_k = sum_g s_g <q - 8, x>_g + z_g sum_g(x). By default
int8 and int4 weights meet x rounded to int8 (_gemv_dp4a, see DP4A); elsewhere they meet x in its
own dtype in _gemv (int4 a byte at a time). A kernel reading int4 as 32-bit words was 1.4-1.5x
faster alone but made the full model's decode 4% slower (docs/performance.md), and is not kept.

Callable from code that torch.compile captures (user-defined Triton kernels are traced), and the
launch has static shapes, so the decode step stays one CUDA graph.
"""

from __future__ import annotations

import inspect

import torch

from ernie_cli.kernels.triton import overlap, tuned

try:  # Triton comes with CUDA builds of torch; CPU-only installs never call this module
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

FORMATS = {"float": 0, "int8": 1, "int4": 2}  # float: the weight's own dtype (bf16, fp16, fp32)
# int8 and int4 weights against x rounded to int8 (one scale per 64 columns, or per int4 group), summed
# four products at a time by the dp4a instruction (_gemv_dp4a): full-model int4 decode 320 -> 450 tok/s,
# int8 412 -> 421 (docs/performance.md). Tests set it False to check the float kernels on int weights.
DP4A = True
# The routed experts' down product forms silu(gate) * up while loading x, saving the kernels that
# would write it (8-layer int4 decode +1.8%; in the captured bf16 step, two kernels a layer).
SWIGLU_IN_DOWN = True
# The Triton interpreter cannot run inline assembly; there the kernel does dp4a's arithmetic in plain ops.
_EMULATE_DP4A = overlap.INTERPRETED


def usable(x: torch.Tensor, fmt: str = "float", group_size: int = 64) -> bool:
    """For this one-token input: on CUDA, with Triton, and a weight format the kernels take."""
    return triton is not None and x.is_cuda and x.shape[0] == 1 and takes(fmt, group_size)


def takes(fmt: str, group_size: int) -> bool:
    """Whether the kernels take this weight format: an int4 group their blocks hold."""
    return fmt != "int4" or group_size in (32, 64, 128)


def usable_eagerly(x: torch.Tensor) -> bool:
    """For the Triton kernels of eager CUDA code (elementwise, dequant): CUDA with Triton, and not
    being traced by torch.compile (Inductor fuses that work itself)."""
    return triton is not None and x.is_cuda and not torch.compiler.is_compiling()


def uses_dp4a(fmt: str, k: int) -> bool:
    """Whether gemv() rounds x to int8 for this weight format and K: int8 or int4 weights, K in whole
    words of either (a multiple of 8), and DP4A set. For int8 on every matrix
    too: keeping the float kernel on the single matrices, where rounding x costs more than dp4a
    saves, lost 10% of 8-layer decode (docs/performance.md)."""
    return DP4A and fmt in ("int8", "int4") and k % 8 == 0


if triton is not None:
    # A name of this module, not overlap.wait_for_inputs: Inductor copies a traced kernel's source
    # with the Triton functions it finds among the module's names, and misses attributes of others.
    from ernie_cli.kernels.triton.overlap import wait_for_inputs

    def _configs():
        # The K=1024 shapes keep more bytes in flight per program, which int4 (half a byte a weight)
        # and the matrices of few rows (too few programs to fill 132 SMs) need.
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
            for bn, bk, w in (
                (16, 256, 4), (32, 256, 4), (8, 512, 4), (16, 512, 8), (32, 128, 4), (64, 128, 8),
                (4, 1024, 4), (8, 1024, 4), (16, 1024, 8),
            )
        ]

    # The tuner's choices are kept in Triton's cache directory where this Triton can, so a second
    # process does not time every configuration again (it cost seconds of every start).
    _keep = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}

    @triton.jit
    def _program_rows(N, BLOCK_N: tl.constexpr):
        # The grid is (blocks of BLOCK_N rows, slots): slot p multiplies expert idx[p] (or the one
        # matrix) by its x and writes output row p.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        return tl.program_id(1), rows, rows < N

    @triton.jit
    def _program_expert(idx_ptr, HAS_IDX: tl.constexpr):
        # A call of its own, apart from _program_rows: Inductor's analysis takes every result of a
        # call to depend on every argument, so with idx_ptr there the output's address "came from"
        # idx, idx counted as written, and the decode graph copied it before every launch (two copy
        # kernels a MoE layer, 8.3% of a bf16 step; tests/test_gpu_gemv.py checks the analysis).
        if HAS_IDX:
            return tl.load(idx_ptr + tl.program_id(1)).to(tl.int64)
        else:
            return 0

    def _int4_configs():
        # BLOCK_W = 64 words divides K/8 of every 21B-A3B matrix (2560, 1536, 3072 and 12288 columns), so
        # its loads carry no masks. More rows a program put more bytes in flight for the same x loads;
        # fewer rows give a small matrix enough programs for 132 SMs.
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w)
            for bn, bw, w in (
                (8, 64, 4), (16, 64, 4), (32, 64, 4), (64, 64, 4), (64, 64, 8),  # K/8 a multiple of 64: no masks
                (4, 128, 4), (8, 128, 4), (8, 256, 4),
            )
        ]

    @triton.jit
    def _dp4a(a, b, c, EMULATE: tl.constexpr):
        # c + the sum of the four byte products of a and b, bytes read as signed. One instruction on
        # sm_61 and later; the interpreter gets the same arithmetic spelled out.
        if EMULATE:
            for j in tl.static_range(4):
                c += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
            return c
        else:
            return tl.inline_asm_elementwise(
                "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1)

    @triton.autotune(configs=_int4_configs(), key=["N", "KW", "P", "FMT"], **_keep)
    @triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
    @triton.jit
    def _gemv_dp4a(
        x_ptr, x_slot_stride, idx_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
        N, P, w_expert_stride, s_expert_stride, w_row_stride, s_row_stride,
        KW: tl.constexpr, FMT: tl.constexpr, GROUP_WORDS: tl.constexpr, HAS_IDX: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, EVEN_N: tl.constexpr, EMULATE: tl.constexpr,
        SWIGLU: tl.constexpr, PDL: tl.constexpr,
    ):
        # Why this shape: the float kernels spend 4-12 instructions a weight turning codes into floats
        # (docs/performance.md), so int8 and int4 GEMVs were bound by instructions, not by memory. Here
        # x is rounded to int8 in registers (one scale per group of GROUP_WORDS words: the int4 group,
        # or 64 columns for int8), packed four to a 32-bit word in the order the weight's bytes lie, and
        # one dp4a multiplies and sums four weights: an int8 word is four columns; an int4 word is eight
        # (nibble 2b is column 8c+2b, nibble 2b+1 column 8c+2b+1), split into even and odd nibbles by
        # two ANDs. Integer sums are exact; the only new error is x's rounding (2^-8 of a group's
        # largest |x|), as llama.cpp's q8_1 activations. Every program rounds x itself: a separate
        # kernel would cost a launch per product. That replicated work is why matrices of few rows
        # per program (int8's shared experts) ran slower here than in _gemv, timed alone.
        wait_for_inputs(PDL)
        slot, rows, row_ok = _program_rows(N, BLOCK_N)
        e = _program_expert(idx_ptr, HAS_IDX)
        NGW: tl.constexpr = BLOCK_W // GROUP_WORDS
        EVEN: tl.constexpr = KW % BLOCK_W == 0
        COLS: tl.constexpr = 8 if FMT == 2 else 4  # columns a word holds
        G: tl.constexpr = (KW + GROUP_WORDS - 1) // GROUP_WORDS  # int4: the last group may be partial
        w_base = w_ptr + e * w_expert_stride + rows[:, None].to(tl.int64) * w_row_stride
        x_base = x_ptr + slot * x_slot_stride
        c = tl.arange(0, BLOCK_W)
        gi = tl.arange(0, NGW)
        zero = tl.zeros((BLOCK_N, BLOCK_W), tl.int32)
        j = tl.arange(0, COLS)
        shift = 4 * (j - j % 2) if FMT == 2 else 8 * j  # where column j's byte goes in its packed word
        acc = tl.zeros((BLOCK_N, NGW), tl.float32)
        for w0 in range(0, KW, BLOCK_W):
            cw = w0 + c
            if EVEN and EVEN_N:
                ok = tl.full((BLOCK_N, BLOCK_W), 1, tl.int1)
                x_ok = tl.full((BLOCK_W,), 1, tl.int1)
            else:
                x_ok = cw < KW
                ok = row_ok[:, None] & x_ok[None, :]
            p = tl.load(w_base + cw[None, :], mask=ok, other=0)
            # x as [words, columns]: each word's columns are 8 or 16 contiguous bytes, one vector load
            xt = tl.load(x_base + COLS * cw[:, None] + j[None, :], mask=x_ok[:, None], other=0.0).to(tl.float32)
            if SWIGLU:  # x holds gate then up: the input is silu(gate) * up, never written to memory
                up = tl.load(x_base + KW * COLS + COLS * cw[:, None] + j[None, :], mask=x_ok[:, None], other=0.0)
                xt = xt * tl.sigmoid(xt) * up.to(tl.float32)
            gmax = tl.max(tl.reshape(tl.max(tl.abs(xt), 1), (NGW, GROUP_WORDS)), 1)
            inv = tl.where(gmax > 0, 127.0 / gmax, 0.0)
            inv_w = tl.reshape(tl.broadcast_to(inv[:, None], (NGW, GROUP_WORDS)), (BLOCK_W,))
            # nearest-even rounding of x * inv (|x * inv| <= 127) by adding 1.5 * 2^23: no conversion
            q = (xt * inv_w[:, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
            byte = (q & 255) << shift[None, :]  # bytes of different columns never overlap: sum = or
            dx = gmax / 127.0
            if FMT == 2:
                even = tl.sum(tl.where(j[None, :] % 2 == 0, byte, 0), 1)
                odd = tl.sum(tl.where(j[None, :] % 2 == 1, byte, 0), 1)
                d = _dp4a(p & 0x0F0F0F0F, even[None, :], zero, EMULATE)
                d = _dp4a((p >> 4) & 0x0F0F0F0F, odd[None, :], d, EMULATE)
                dg = tl.sum(tl.reshape(d, (BLOCK_N, NGW, GROUP_WORDS)), 2)
                qsum = tl.sum(tl.reshape(tl.sum(q, 1), (NGW, GROUP_WORDS)), 1)
                xsum = tl.sum(tl.reshape(tl.sum(xt, 1), (NGW, GROUP_WORDS)), 1)
                g = w0 // GROUP_WORDS + gi
                gok = row_ok[:, None] & (g < G)[None, :]
                s = tl.load(s_ptr + e * s_expert_stride + rows[:, None].to(tl.int64) * s_row_stride + g[None, :], mask=gok, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + e * s_expert_stride + rows[:, None].to(tl.int64) * s_row_stride + g[None, :], mask=gok, other=0.0).to(tl.float32)
                # sum (q - 8) x = dx (sum q x8 - 8 sum x8) per group; the zeros meet x's exact sums
                acc += s * (dx[None, :] * (dg - 8 * qsum[None, :]).to(tl.float32)) + z * xsum[None, :]
            else:
                d = _dp4a(p, tl.sum(byte, 1)[None, :], zero, EMULATE)
                dg = tl.sum(tl.reshape(d, (BLOCK_N, NGW, GROUP_WORDS)), 2)
                acc += dx[None, :] * dg.to(tl.float32)
        y = tl.sum(acc, 1)
        if FMT == 1:
            y = y * tl.load(s_ptr + e * s_expert_stride + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + slot * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.autotune(configs=_configs(), key=["N", "K", "P", "FMT"], **_keep)
    @triton.jit
    def _gemv(
        x_ptr, x_slot_stride, idx_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
        N, K, P, w_expert_stride, s_expert_stride, w_row_stride, s_row_stride,
        FMT: tl.constexpr, GROUP: tl.constexpr, HAS_IDX: tl.constexpr, SWIGLU: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_inputs(PDL)
        slot, rows, row_ok = _program_rows(N, BLOCK_N)
        e = _program_expert(idx_ptr, HAS_IDX)
        x_base = x_ptr + slot * x_slot_stride
        if FMT == 2:
            # The codes are put back in column order in registers (join + reshape) so that x is read
            # contiguously: reading x's even and odd entries as two stride-2 gathers cost one load
            # instruction per weight, and this kernel is bound by its instructions, not by memory.
            HALF: tl.constexpr = BLOCK_K // 2
            NG: tl.constexpr = BLOCK_K // GROUP
            groups = (K + GROUP - 1) // GROUP
            w_base = w_ptr + e * w_expert_stride + rows[:, None].to(tl.int64) * w_row_stride
            s_base = s_ptr + e * s_expert_stride + rows[:, None].to(tl.int64) * s_row_stride
            z_base = z_ptr + e * s_expert_stride + rows[:, None].to(tl.int64) * s_row_stride
            acc = tl.zeros((BLOCK_N,), tl.float32)
            j = tl.arange(0, HALF)
            c = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                ok = row_ok[:, None] & ((k0 + 2 * j) < K)[None, :]
                packed = tl.load(w_base + (k0 // 2 + j)[None, :], mask=ok, other=0).to(tl.int32)
                lo = (packed & 0xF).to(tl.float32) - 8.0
                hi = (packed >> 4).to(tl.float32) - 8.0
                xv = tl.load(x_base + k0 + c, mask=(k0 + c) < K, other=0.0).to(tl.float32)
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
                dots = tl.sum(tl.reshape(w * xv[None, :], (BLOCK_N, NG, GROUP)), 2)
                xsum = tl.sum(tl.reshape(xv, (NG, GROUP)), 1)
                g = k0 // GROUP + tl.arange(0, NG)
                g_ok = row_ok[:, None] & (g < groups)[None, :]
                s = tl.load(s_base + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
                z = tl.load(z_base + g[None, :], mask=g_ok, other=0.0).to(tl.float32)
                acc += tl.sum(s * dots + z * xsum[None, :], 1)
            y = acc
        else:
            cols = tl.arange(0, BLOCK_K)
            w_base = w_ptr + e * w_expert_stride + rows[:, None].to(tl.int64) * w_row_stride
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ok = row_ok[:, None] & ((k0 + cols) < K)[None, :]
                w = tl.load(w_base + (k0 + cols)[None, :], mask=ok, other=0)
                if FMT == 1:  # 1.5 * 2^23 + q as float bits, minus 1.5 * 2^23: no int-to-float instruction
                    w = (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
                else:
                    w = w.to(tl.float32)
                x = tl.load(x_base + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
                if SWIGLU:  # x holds gate then up, as in _gemv_dp4a
                    up = tl.load(x_base + K + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
                    x = x * tl.sigmoid(x) * up
                acc2 += w * x[None, :]
            y = tl.sum(acc2, 1)
            if FMT == 1:
                y = y * tl.load(s_ptr + e * s_expert_stride + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + slot * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv(fmt: str, x: torch.Tensor, weight: torch.Tensor, scales=None, zeros=None, group_size: int = 64,
         experts: torch.Tensor | None = None, per_expert_x: bool = False,
         block: tuple[int, int] | None = None, swiglu: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One token: x [K] (or [P, K] with per_expert_x) against weight [N, K] or the experts `experts`
    [P] of a stack [E, N, K] (int4: [.., N, K/2]) -> [P, N] in out_dtype (default x's dtype; P = 1
    without experts).

    swiglu: x is [.., 2K], gate then up, and the product's input is silu(gate) * up, formed while
    loading x (a decode step saves the two kernels that would write it). The int4 float kernel
    (DP4A off) gets it from torch ops first.

    int4 needs a group size of 32, 64 or 128 (takes() checks);
    int8 and int4 go through the dp4a kernel where uses_dp4a() says so, else through the float kernels.
    block=(BLOCK_N, BLOCK_K) skips the tuner (tests under TRITON_INTERPRET, benchmarks)."""
    x = x.contiguous()
    n = weight.shape[-2]
    k = x.shape[-1] // 2 if swiglu else x.shape[-1]
    forms_swiglu = SWIGLU_IN_DOWN and (fmt != "int4" or uses_dp4a(fmt, k))  # not the byte-wise int4 kernel
    if swiglu and not forms_swiglu:
        gate, up = x.chunk(2, dim=-1)
        x, swiglu = (torch.nn.functional.silu(gate) * up).contiguous(), False
    p = 1 if experts is None else experts.numel()
    out = torch.empty((p, n), dtype=out_dtype or x.dtype, device=x.device)
    stacked = weight.dim() == 3
    w_stride = weight.stride(0) if stacked else 0
    s_stride = scales.stride(0) if (stacked and scales is not None) else 0
    dummy = weight  # unused pointer arguments still need a tensor
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), p)  # noqa: E731
    if block is None and not torch.compiler.is_compiling():  # seeded by the eager runs before any trace
        tuned.seed("_gemv_dp4a" if uses_dp4a(fmt, k) else "_gemv", x.device.index or 0)
    if uses_dp4a(fmt, k):
        cols = 8 if fmt == "int4" else 4
        words = weight.view(torch.int32)
        fixed = {} if block is None else {"BLOCK_N": block[0], "BLOCK_W": block[1] // cols}
        (_gemv_dp4a if block is None else _gemv_dp4a.fn)[grid](
            x, x.shape[-1] if per_expert_x else 0, experts if experts is not None else dummy, words, scales,
            zeros if zeros is not None else dummy, out,
            n, p, w_stride // 4, s_stride, words.stride(-2), scales.stride(-2) if fmt == "int4" else 0,
            KW=k // cols, FMT=FORMATS[fmt], GROUP_WORDS=(group_size if fmt == "int4" else 64) // cols,
            HAS_IDX=experts is not None, EMULATE=_EMULATE_DP4A, SWIGLU=swiglu, **fixed, **overlap.launch_args(x),
        )
        return out
    kernel, fixed = (_gemv, {}) if block is None else (_gemv.fn, {"BLOCK_N": block[0], "BLOCK_K": block[1]})
    kernel[grid](
        x, x.shape[-1] if per_expert_x else 0, experts if experts is not None else dummy, weight,
        scales if scales is not None else dummy, zeros if zeros is not None else dummy, out,
        n, k, p, w_stride, s_stride, weight.stride(-2), scales.stride(-2) if fmt == "int4" else 0,
        FMT=FORMATS[fmt], GROUP=group_size, HAS_IDX=experts is not None, SWIGLU=swiglu, **fixed,
        **overlap.launch_args(x),
    )
    return out
